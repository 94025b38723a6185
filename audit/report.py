"""The self-contained HTML audit report (reports/audit.html).

Two steps, so that the data can be built by anyone and the rendering stays pure:

`build_context(root, params, data=None) -> dict` reads metrics/*.json, data/prepared/meta.json and
data/tasks/summary.json (when present) and returns a plain, JSON-serialisable dict.
`render_report(context) -> str` turns that dict into HTML (charts are drawn here, from the dict),
with Jinja2 autoescaping and StrictUndefined, so every string from data or params is escaped and a
missing key is an error rather than a silently empty cell. `write_report(root, params)` does both
and writes the file atomically.

The context dict (all keys required; lists may be empty, numbers may be None):
- title: str; version: str (package version)
- focus: {model, scenario, metric, lower_is_better: bool, models: [str], scenarios: [str]}
    the model the audit is about, the scenario/metric used for charts; chosen from params
    `report.{focal_model,scenario,metric}` or defaults (melu, user_cold, mae).
- verdict: {available: bool, passed: bool|None, n_pass, n_fail, n_inconclusive, gates: [gate record],
    findings: [str]}; n_fail counts gates that count as failing (failed, or inconclusive with
    on_inconclusive: fail). gate record: {name, description, field, op, threshold, observed, outcome
    (pass|fail|inconclusive), passed, on_inconclusive, message, error, interval, interval_low,
    interval_high, file, where} as in metrics/gate.json.
- model_card: {details: [[label, value]], intended_use, out_of_scope, factors, metrics,
    evaluation_data, training_data, quantitative, ethical, caveats}: each a list of sentences.
    What each model is ("Type", and one "Compared model: <name>" row per other model) is the
    model class's own `description`; what the data is comes from data/prepared/meta.json.
- data: {available: bool, source, path, checksum, files: [{name, sha256}],
    counts: {ratings, users, items}, rating_range: [min, max] | None, sensitive: [str],
    user_attributes: [str], item_features: [str], groups: [{attribute, group, n_users}],
    intersections: [{attributes, group, n_users}],
    scenarios: [{scenario, n_users, n_items, n_ratings, n_tasks}], top_items: [{item_id, title, n_ratings}]}
    Missing values may be None; the lead's pipeline may pass this dict directly (`data=`).
- accuracy: {scenarios: [{scenario, models: [str], metrics: [str] (every metric, focal first),
    rows: [{model, focal, cells: [{mean, ci_low, ci_high, ci_users_low, ci_users_high, n_seeds, best}]}]
    (the full table), families: [{family, metrics: [{metric, direction, cells}]}] (the compact table:
    registry families, constant/count/superseded metrics and all but one cut-off left out),
    omitted: [{metric, reason}], comparisons: [comparison record + winner], n_significant, summary: str}],
    omitted_note: str} (ci_*: over training seeds; ci_users_*: over seeds and users; `best` from the
    registry's direction)
- fairness: {min_group_size, matrix: {attributes, rows: [{model, scenario, focal, cells: [{attribute,
    n_tests, n_insufficient, found: [{metric, difference, p_adjusted, max_group, min_group}]}]}],
    n_found, n_tests, adjusted: bool, adjustment}, gaps: [gap records + survives, focal model],
    gaps_all: [gap records + survives, focal scenario], groups: [{attribute, rows: [group_metric + small],
    n_small}], gap_to_rest (+ small), gap_to_rest_found, ugf, parity, counterfactual,
    exposure (+ exposure_gini, read from `gini` in older files), miscalibration (+ small)}
    A gap "survives" when its BH-adjusted p is below 0.05 and it is not insufficient; records
    from older runs (no p_adjusted, no insufficient) are read with .get and never survive.
- robustness: {perturbations: [{name, numeric: bool, overall: [{model, points: [[level, value]]}],
    by_group: [{attribute, series: [{group, points}], omitted}], table, levels, pivot}] (named levels,
    e.g. a demographic shift's group mixes, are a table, not a curve), most_damaging, shilling: [records]}
- regression: {available, reason, verdict, baseline, accuracy: [accuracy_change], gaps: [gap_change],
    n_not_pass} from metrics/regression.json ("no baseline configured" when absent or baseline null)
- feedback: None, or audit.feedback_report.feedback_context (its section shows only when the stage ran)
- glossary: {metrics: registry.glossary rows, unregistered: [str], tests: [{anchor, name, definition, reference}]}
- reproducibility: {seeds: [int], spread: [{model, values, mean, std, ci_low, ci_high}],
    determinism: [records], all_identical: bool|None, seed_variance: [records],
    environment: [[key, value]], hashes: [[name, sha256]]}
- signature: audit.signing.signature_context(...) (keyid, fingerprint, development_key,
    key_source, public_key_pem, subjects, bundle, public_key_path, payload_type)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import jinja2
from markupsafe import Markup

from audit import charts, registry
from metarec.errors import MetarecError
from metarec.io import atomic_write_text, sha256_file

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "reports" / "templates"
SCENARIO_ORDER = ("warm", "user_cold", "item_cold", "user_item_cold", "val")
META_LEARNERS = ("melu", "ensemble", "finetune")
METRIC_FILES = ("summary", "fairness", "robustness", "reproducibility", "gate")
OPTIONAL_FILES = ("regression", "feedback")   # written by optional stages; the report says when absent
UNRECORDED_SOURCE = "data of unrecorded source"


class ReportError(MetarecError):
    """The report cannot be rendered (missing metrics, template error)."""


def lower_is_better(metric: str) -> bool:
    """The registry's direction; a name it does not know (an older run's) falls back to its prefix."""
    if registry.is_registered(metric):
        return registry.lower_is_better(metric)
    return metric.lower().startswith(("mae", "rmse", "mse", "miscal", "loss"))


def metric_anchor(name: Any) -> str:
    """The glossary anchor of a metric name, or "" when the registry does not know it."""
    return registry.anchor(str(name)) if name is not None and registry.is_registered(str(name)) else ""


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON ({exc})") from None


def load_metrics(root: Path) -> dict[str, dict[str, Any] | None]:
    """metrics/<name>.json for the known names (None when absent)."""
    out: dict[str, dict[str, Any] | None] = {}
    for name in METRIC_FILES:
        doc = _read_json(root / "metrics" / f"{name}.json")
        if doc is not None and (not isinstance(doc, dict) or not isinstance(doc.get("records"), list)):
            raise ReportError(f"metrics/{name}.json has no top-level 'records' list")
        out[name] = doc
    for name in OPTIONAL_FILES:
        doc = _read_json(root / "metrics" / f"{name}.json")
        out[name] = doc if isinstance(doc, dict) else None
    return out


def _records(doc: dict[str, Any] | None, kind: str, **where: Any) -> list[dict[str, Any]]:
    if not doc:
        return []
    return [r for r in doc["records"] if isinstance(r, dict) and r.get("kind") == kind
            and all(r.get(k) == v for k, v in where.items())]


def _rank(name: Any, order: list[str]) -> tuple[int, str]:
    """Sort key: position in the preferred order (params' model list), unknown names last."""
    return (order.index(name) if name in order else len(order), str(name))


def _ordered(values: Iterable[str], preferred: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(v for v in values if v is not None))
    pref = [p for p in preferred if p in seen]
    return pref + [v for v in seen if v not in pref]


# ----------------------------------------------------------------------------- data section
def data_context_from_files(root: Path, strata: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report's `data` dict from the pipeline's own files: data/prepared/meta.json (source,
    checksums, counts, spec), data/tasks/summary.json (users, tasks, ratings per split), the strata
    counts of metrics/summary.json (group sizes), and the most rated items (titles are data, so
    they exercise the escaping). A missing file raises: a report must not silently drop a section.
    """
    import pandas as pd

    for f in ("data/prepared/meta.json", "data/tasks/summary.json"):
        if not (root / f).is_file():
            raise ReportError(f"cannot render the report: {f} is missing (run the prepare and tasks stages)")
    meta = _read_json(root / "data" / "prepared" / "meta.json")
    summary = _read_json(root / "data" / "tasks" / "summary.json")
    prov, spec = meta["provenance"], meta["spec"]
    overall = [r for r in summary["rows"] if r["attribute"] == "all"]
    order = list(dict.fromkeys(("train", "val") + SCENARIO_ORDER))
    scenarios = sorted(({"scenario": r["split"], "n_users": r["users"], "n_items": r.get("items"),
                         "n_ratings": r["ratings"], "n_tasks": r["tasks"]} for r in overall),
                       key=lambda r: _rank(r["scenario"], order))
    strata = strata or []
    groups = [{"attribute": r["attribute"], "group": str(r["group"]), "n_users": r["n"]}
              for r in strata if " x " not in r["attribute"]]
    inter = [{"attributes": r["attribute"], "group": str(r["group"]), "n_users": r["n"]}
             for r in strata if " x " in r["attribute"]]
    top: list[dict[str, Any]] = []
    items_path, ratings_path = root / "data/prepared/items.parquet", root / "data/prepared/ratings.parquet"
    if items_path.is_file() and ratings_path.is_file():
        counts = pd.read_parquet(ratings_path, columns=["item_id"])["item_id"].value_counts()
        titles = pd.read_parquet(items_path).set_index("item_id").get("title")
        for item, n in counts.sort_index().sort_values(ascending=False, kind="stable").head(10).items():
            title = titles.get(item) if titles is not None else None
            top.append({"item_id": int(item), "title": "" if title is None else str(title), "n_ratings": int(n)})
    return {
        "available": True, "source": meta["source"], "path": prov.get("location"),
        "checksum": prov.get("canonical_sha256"),
        # csv/parquet sources record {path, sha256} per file, MovieLens the digest alone
        "files": [{"name": k, "sha256": v.get("sha256") if isinstance(v, dict) else v}
                  for k, v in sorted((prov.get("files") or {}).items())],
        "counts": {k: meta["counts"].get(k) for k in ("ratings", "users", "items")},
        "rating_range": [spec["rating_min"], spec["rating_max"]],
        "sensitive": [str(x) for x in spec["sensitive"]],
        "user_attributes": [str(a["name"]) for a in spec.get("user_attributes", [])],
        "item_features": [str(a["name"]) for a in spec.get("item_features", [])],
        "groups": groups, "intersections": inter, "scenarios": scenarios, "top_items": top,
    }


DATA_DEFAULTS: dict[str, Any] = {
    "available": True, "source": None, "path": None, "checksum": None, "files": [], "rating_range": None,
    "sensitive": [], "user_attributes": [], "item_features": [], "groups": [], "intersections": [], "scenarios": [],
    "top_items": [],
}


def normalise_data(data: dict[str, Any]) -> dict[str, Any]:
    """A caller-built `data` dict with every key the template reads (absent ones empty, not errors)."""
    out = {**DATA_DEFAULTS, **data}
    out["counts"] = {k: (data.get("counts") or {}).get(k) for k in ("ratings", "users", "items")}
    return out


# ----------------------------------------------------------------------------- sections
def _focus(params: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    acc = _records(metrics.get("summary"), "accuracy")
    models = _ordered([r.get("model") for r in acc] + list(params.get("models") or []), params.get("models") or [])
    scenarios = _ordered([r.get("scenario") for r in acc], SCENARIO_ORDER)
    metric_names = _ordered([r.get("metric") for r in acc], ("mae",))
    rep = params.get("report") or {}
    model = rep.get("focal_model") or next((m for m in META_LEARNERS if m in models), models[0] if models else "")
    scenario = rep.get("scenario") or next((s for s in ("user_cold", "user_item_cold", "item_cold", "warm")
                                            if s in scenarios), scenarios[0] if scenarios else "")
    metric = rep.get("metric") or (metric_names[0] if metric_names else "mae")
    return {"model": model, "scenario": scenario, "metric": metric, "lower_is_better": lower_is_better(metric),
            "models": models, "scenarios": scenarios}


FAMILY_ORDER = ("rating error", "ranking", "lists and exposure")
SUPERSEDED = {"mse": "rmse"}   # shown only in the full table when the metric on the right is present
# Metrics that answer the same question as one the compact table shows (kept in the full table):
# precision@k of a fixed-length list moves with recall@k; the pooled "liked" precision and recall
# with the pooled AUC; ARP with APLT (popularity bias); diversity with novelty.
SECONDARY = {"precision": "auc", "recall": "auc", "arp": "aplt", "diversity": "novelty"}
ALPHA = 0.05


def _family(name: str) -> str:
    return registry.lookup(name).family if registry.is_registered(name) else "other"


def _cutoff_shown(name: str, present: Iterable[str], focal_metric: str) -> str:
    """The one cut-off of a metric family the compact table shows: the focal metric when it is of
    this family, else the largest cut-off (the one averaged over most items)."""
    if "@" not in name or not registry.is_registered(name):
        return name
    family = registry.lookup(name).name
    same = [n for n in present if "@" in n and registry.is_registered(n) and registry.lookup(n).name == family]
    if focal_metric in same:
        return focal_metric
    return max(same, key=lambda n: int(n.rpartition("@")[2]) if n.rpartition("@")[2].isdigit() else 0)


def _omission(name: str, means: list[float], present: set[str], focal_metric: str) -> str | None:
    """Why a metric stays out of a scenario's compact table (None: it is shown).

    A count is not a quality measure; a metric with the same value for every model tells nothing
    about the models (APLT = 1 and ARP = 0 in item_cold, where every candidate is new by
    construction); MSE repeats RMSE squared; one cut-off of an @k family stands for the others.
    All of them stay in the full table."""
    if registry.is_registered(name) and registry.direction(name) == 0:
        return "a count or a signed change, not a quality measure"
    if len(means) > 1 and max(means) - min(means) <= 1e-12 * max(1.0, abs(max(means))):
        return "the same value for every model (constant by construction)"
    if SUPERSEDED.get(name) in present:
        return f"its root, {SUPERSEDED[name]}, is shown"
    same = SECONDARY.get(name) or (name.replace("precision@", "recall@", 1) if name.startswith("precision@") else None)
    if same in present:
        return f"{same} is shown for the same question"
    shown = _cutoff_shown(name, present, focal_metric)
    if shown != name:
        return f"another cut-off of the same metric, {shown}, is shown"
    return None


def _cell(r: dict[str, Any]) -> dict[str, Any]:
    return {"mean": _num(r.get("mean")), "ci_low": _num(r.get("ci_low")), "ci_high": _num(r.get("ci_high")),
            "ci_users_low": _num(r.get("ci_users_low")), "ci_users_high": _num(r.get("ci_users_high")),
            "n_seeds": r.get("n_seeds"), "best": False}


def _accuracy(metrics: dict[str, Any], focus: dict[str, Any]) -> dict[str, Any]:
    """Per scenario: a compact table (metrics as rows, grouped by registry family, models as columns)
    of the metrics that tell models apart, the full table of every metric, and the comparisons."""
    acc = _records(metrics.get("summary"), "accuracy")
    comp = _records(metrics.get("summary"), "comparison")
    out, omitted_all = [], []
    for scenario in focus["scenarios"]:
        recs = [r for r in acc if r.get("scenario") == scenario]
        models = _ordered([r.get("model") for r in recs], focus["models"])
        names = _ordered([r.get("metric") for r in recs], (focus["metric"],))
        table: dict[str, list[dict[str, Any]]] = {}
        for m in names:
            cells = [_cell(next((x for x in recs if x.get("model") == model and x.get("metric") == m), {}))
                     for model in models]
            best = (registry.better(m, [c["mean"] for c in cells]) if registry.is_registered(m) else
                    (min if lower_is_better(m) else max)([c["mean"] for c in cells if c["mean"] is not None] or [0.0]))
            for c in cells:
                c["best"] = best is not None and c["mean"] is not None and c["mean"] == best
            table[m] = cells
        present = set(names)
        families: dict[str, list[dict[str, Any]]] = {}
        omitted = []
        for m in names:
            why = _omission(m, [c["mean"] for c in table[m] if c["mean"] is not None], present, focus["metric"])
            if why:
                omitted.append({"metric": m, "reason": why})
                continue
            families.setdefault(_family(m), []).append({"metric": m, "cells": table[m], "direction": (
                registry.lookup(m).direction if registry.is_registered(m) else
                "lower" if lower_is_better(m) else "higher")})
        fam_order = _ordered(families, FAMILY_ORDER)
        for f in fam_order:
            families[f].sort(key=lambda row: _metric_sort_key(row["metric"]))
        comps = []
        for c in comp:
            if c.get("scenario") != scenario:
                continue
            better = c.get("better")
            winner = c.get("model") if better == "model" else c.get("baseline") if better == "baseline" else "tie"
            comps.append({**c, "winner": winner})
        comps.sort(key=lambda c: (c.get("model") != focus["model"], str(c.get("metric")), str(c.get("model")),
                                  str(c.get("baseline"))))
        fm = focus["metric"]
        summary = ""
        if fm in table:
            best_models = [mod for mod, c in zip(models, table[fm]) if c["best"]]
            focal = table[fm][models.index(focus["model"])] if focus["model"] in models else None
            if best_models:
                summary = f"Best {fm}: {', '.join(best_models)}"
                if focal and focus["model"] not in best_models and focal["mean"] is not None:
                    summary += f"; {focus['model']} scores {focal['mean']:.4f}"
                summary += "."
        rows = [{"model": model, "focal": model == focus["model"], "cells": [table[m][i] for m in names]}
                for i, model in enumerate(models)]
        omitted_all += [{**o, "scenario": scenario} for o in omitted]
        excluded = next((r for r in (metrics.get("summary") or {}).get("excluded", [])
                         if r.get("scenario") == scenario and r.get("n_users")), None)
        out.append({"scenario": scenario, "models": models, "metrics": names, "rows": rows,
                    "families": [{"family": f, "metrics": families[f]} for f in fam_order],
                    "omitted": omitted, "comparisons": comps, "excluded": excluded,
                    "n_significant": sum(c["winner"] != "tie" for c in comps), "summary": summary})
    return {"scenarios": out, "omitted_note": _omitted_note(omitted_all, len(out)),
            "sample": _sample(metrics.get("summary"))}


def _sample(summary: dict | None) -> dict | None:
    """The sampled evaluation (audit.sampling) in words: the rule and users per scenario; None when
    everyone was evaluated."""
    sample = (summary or {}).get("sample")
    if not sample:
        return None
    rule = sample["rule"]
    parts = ([f"target half-width {rule['half_width']} of each group's mean MAE"] if rule.get("half_width") else []) + \
        ([f"at most {rule['max_per_group']} users per group"] if rule.get("max_per_group") else [])
    sizes = [f"{s}: {r['sampled']} of {r['population']} users in {r['n_strata']} strata"
             for s, r in sample["scenarios"].items()]
    return {"rule": f"{' and '.join(parts)}, never fewer than {rule['min_group_size']} per group; seed {sample['seed']}",
            "sizes": "; ".join(sizes)}


def _metric_sort_key(name: str) -> tuple[int, int, str]:
    """Registry order, then the cut-off (ndcg@1 before ndcg@10)."""
    base = registry.lookup(name).name if registry.is_registered(name) else name
    order = [m.name for m in registry.METRICS]
    k = name.rpartition("@")[2]
    return (order.index(base) if base in order else len(order), int(k) if k.isdigit() else 0, name)


def _omitted_note(omitted: list[dict[str, Any]], n_scenarios: int) -> str:
    """One sentence for every omission: metrics left out for one reason in the same scenarios are
    named together, and "everywhere" is said once instead of per scenario."""
    where: dict[tuple[str, str], list[str]] = {}
    for o in omitted:
        where.setdefault((o["metric"], o["reason"]), []).append(o["scenario"])
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (metric, reason), scen in where.items():
        groups.setdefault((reason, tuple(scen)), []).append(metric)
    parts = []
    for (reason, scen), names in groups.items():
        place = "" if len(scen) == n_scenarios else f" in {', '.join(scen)}"
        parts.append(f"{', '.join(sorted(names, key=_metric_sort_key))}{place}: {reason}")
    return ("Left out of the compact tables, and kept in each scenario's full table: " + "; ".join(parts) + "."
            if parts else "")


def _survives(g: dict[str, Any]) -> bool:
    """A gap counts as a finding only when its BH-adjusted p is below alpha and its groups are big enough."""
    if g.get("insufficient"):
        return False
    if isinstance(g.get("significant"), bool) and _num(g.get("p_adjusted")) is not None:
        return g["significant"]
    q = _num(g.get("p_adjusted"))
    return q is not None and q < ALPHA


def _fairness_matrix(gaps: list[dict[str, Any]], focus: dict[str, Any]) -> dict[str, Any]:
    """Rows model x scenario, columns attributes: the gaps that survive the BH adjustment."""
    models = _ordered([g.get("model") for g in gaps], focus["models"])
    scenarios = _ordered([g.get("scenario") for g in gaps], focus["scenarios"])
    attributes = _ordered([g.get("attribute") for g in gaps], [])
    rows = []
    for model in models:
        for scenario in scenarios:
            mine = [g for g in gaps if g.get("model") == model and g.get("scenario") == scenario]
            if not mine:
                continue
            cells = []
            for attr in attributes:
                tests = [g for g in mine if g.get("attribute") == attr]
                found = sorted((g for g in tests if _survives(g)), key=lambda g: _num(g.get("p_adjusted")) or 0)
                cells.append({"attribute": attr, "n_tests": len(tests),
                              "n_insufficient": sum(bool(g.get("insufficient")) for g in tests),
                              "found": [{"metric": g.get("metric"), "difference": _num(g.get("difference")),
                                         "p_adjusted": _num(g.get("p_adjusted")), "max_group": g.get("max_group"),
                                         "min_group": g.get("min_group")} for g in found]})
            rows.append({"model": model, "scenario": scenario, "focal": model == focus["model"], "cells": cells})
    return {"attributes": attributes, "rows": rows,
            "n_found": sum(len(c["found"]) for r in rows for c in r["cells"]),
            "n_tests": len(gaps),
            "adjusted": any(_num(g.get("p_adjusted")) is not None for g in gaps),
            "adjustment": next((str(g["adjustment"]) for g in gaps if g.get("adjustment")), "BH")}


def _small(r: dict[str, Any], min_size: Any) -> bool:
    """Marked insufficient by the statistics, or (older runs) below the recorded minimum size."""
    if r.get("insufficient") is not None:
        return bool(r["insufficient"])
    n, floor = _num(r.get("n")), _num(min_size)
    return n is not None and floor is not None and n < floor


def _fairness(metrics: dict[str, Any], focus: dict[str, Any]) -> dict[str, Any]:
    """Fairness tables for the report. ``gaps`` holds only gaps between groups of sufficient size
    (what charts, findings and the model card may quote); ``gaps_insufficient`` lists the rest."""
    doc = metrics.get("fairness")
    fm, fs, fmet = focus["model"], focus["scenario"], focus["metric"]
    min_size = (doc or {}).get("min_group_size")
    gaps_all = [{**g, "survives": _survives(g)} for g in _records(doc, "gap")]
    gaps = sorted([g for g in gaps_all if g.get("model") == fm], key=lambda r: (
        _rank(r.get("scenario"), focus["scenarios"]), _metric_sort_key(str(r.get("metric"))), str(r.get("attribute"))))
    gm = [{**r, "small": _small(r, min_size)} for r in _records(doc, "group_metric", model=fm, scenario=fs, metric=fmet)]
    groups = [{"attribute": a, "rows": [r for r in gm if r.get("attribute") == a],
               "n_small": sum(r["small"] for r in gm if r.get("attribute") == a)}
              for a in _ordered([r.get("attribute") for r in gm], [])]
    rest = [{**r, "small": _small(r, min_size)} for r in _records(doc, "gap_to_rest", model=fm, scenario=fs)]
    exposure = [{**r, "exposure_gini": r.get("exposure_gini", r.get("gini"))} for r in _records(doc, "exposure", scenario=fs)]
    miscal = [{**r, "small": _small(r, min_size)} for r in _records(doc, "miscalibration", model=fm, scenario=fs)]
    tests = [r for r in (doc or {}).get("records", []) if r.get("model") == fm and r.get("p_adjusted") is not None]
    return {
        "available": doc is not None,
        "min_group_size": min_size,
        "matrix": _fairness_matrix(gaps_all, focus),
        "gaps": gaps,
        "gaps_all": [g for g in gaps_all if g.get("scenario") == fs],
        "gaps_insufficient": [g for g in gaps if g.get("insufficient")],
        "groups": groups,
        "gap_to_rest": rest,
        "gap_to_rest_found": [r for r in rest if not r["small"] and (_num(r.get("p_adjusted")) or 1.0) < ALPHA],
        "ugf": _records(doc, "ugf", model=fm),
        "parity": _records(doc, "parity", model=fm, scenario=fs),
        "counterfactual": _records(doc, "counterfactual", model=fm, scenario=fs),
        "exposure": sorted(exposure, key=lambda r: _rank(r.get("model"), focus["models"])),
        "miscalibration": miscal,
        "tests": tests,
        "survivors": [r for r in tests if r.get("significant")],
        "alpha": (doc or {}).get("alpha", ALPHA),
        "seeds": (doc or {}).get("seeds"),
    }


def _fairness_finding(fa: dict[str, Any], model: str, metric: str) -> str:
    """The fairness sentence of the key findings: only tests that survive Benjamini-Hochberg
    within their family and rest on groups of sufficient size; says so plainly when none does."""
    tests, alive = fa.get("tests", []), fa.get("survivors", [])
    size = f"groups under {fa['min_group_size']} users are shown but not tested" if fa.get("min_group_size") else ""
    if not tests:
        return f"No fairness test was recorded for {model}."
    n_fam = len({r.get("family") for r in tests})
    families = f"{n_fam} famil{'y' if n_fam == 1 else 'ies'}"
    if not alive:
        return (f"No fairness difference for {model} survives Benjamini-Hochberg adjustment: 0 of {len(tests)} tests "
                f"in {families} (one per scenario) at alpha {_fmt(fa.get('alpha'))}"
                + (f"; {size}." if size else "."))
    gaps = [g for g in alive if g.get("kind") == "gap" and _num(g.get("difference")) is not None]
    pick = [g for g in gaps if g.get("metric") == metric] or gaps
    head = (f"{len(alive)} of {len(tests)} fairness tests for {model} survive Benjamini-Hochberg adjustment "
            f"(alpha {_fmt(fa.get('alpha'))}, one family per scenario)")
    if not pick:
        r = min(alive, key=lambda r: r["p_adjusted"])
        return (head + f"; the strongest is {r.get('kind')} of {r.get('metric')} for {r.get('attribute', 'users')}"
                f"{' / ' + str(r['group']) if r.get('group') else ''} in {r.get('scenario')} "
                f"(p = {_fmt(r.get('p_value'), 2)}, adjusted {_fmt(r.get('p_adjusted'), 2)}).")
    g = max(pick, key=lambda g: g["difference"])
    return (head + f". Largest: {g.get('metric')} by {g['attribute']} in {g['scenario']}, {g.get('max_group')} vs "
            f"{g.get('min_group')} differ by {_fmt(g['difference'])} ({g.get('interval') or '95% interval'}: "
            f"{_fmt(g.get('diff_ci_low'))} to {_fmt(g.get('diff_ci_high'))}; p = {_fmt(g.get('p_value'), 2)}, "
            f"BH-adjusted {_fmt(g.get('p_adjusted'), 2)}).")


MAX_GROUP_LINES = 8


def _robustness(metrics: dict[str, Any], focus: dict[str, Any]) -> dict[str, Any]:
    """Curves of perturbations with numeric levels (charts), and a table for those whose levels are
    named (a demographic shift's levels are group mixes such as 'F=0.5,M=0.5', not points on an axis)."""
    doc = metrics.get("robustness")
    curves = _records(doc, "curve", scenario=focus["scenario"], metric=focus["metric"])
    perts = []
    for name in _ordered([r.get("perturbation") for r in curves], []):
        rs = [r for r in curves if r.get("perturbation") == name]
        numeric = all(_num(r.get("level")) is not None for r in rs)
        overall, table = [], []
        for model in _ordered([r.get("model") for r in rs], focus["models"]):
            mine = [r for r in rs if r.get("model") == model and r.get("attribute") == "all"]
            if numeric:
                pts = sorted((float(r["level"]), _num(r.get("value"))) for r in mine)
                overall.append({"model": model, "points": [list(p) for p in pts]})
            else:
                table += [{"model": model, "level": str(r.get("level")), "value": _num(r.get("value")),
                           "delta": _num(r.get("delta")), "n": r.get("n")} for r in mine]
        by_group = []
        focal = [r for r in rs if r.get("model") == focus["model"] and r.get("attribute") != "all"] if numeric else []
        for attr in _ordered([r.get("attribute") for r in focal], []):
            ar = [r for r in focal if r.get("attribute") == attr]
            sizes: dict[str, float] = {}
            for r in ar:
                sizes[str(r.get("group"))] = max(sizes.get(str(r.get("group")), 0), _num(r.get("n")) or 0)
            keep = sorted(sizes, key=lambda g: (-sizes[g], g))[:MAX_GROUP_LINES]
            series = [{"group": g, "points": [list(p) for p in sorted(
                (float(r["level"]), _num(r.get("value"))) for r in ar if str(r.get("group")) == g)]} for g in keep]
            by_group.append({"attribute": attr, "series": series, "omitted": max(0, len(sizes) - len(keep))})
        levels = _ordered([t["level"] for t in table], ["none"])
        pivot = [{"model": model, "focal": model == focus["model"],
                  "cells": [next((t for t in table if t["model"] == model and t["level"] == lv), None) for lv in levels]}
                 for model in _ordered([t["model"] for t in table], focus["models"])]
        perts.append({"name": name, "numeric": numeric, "overall": overall, "by_group": by_group, "table": table,
                      "levels": levels, "pivot": pivot})
    damaging = sorted(_records(doc, "most_damaging", scenario=focus["scenario"]),
                      key=lambda r: (str(r.get("perturbation")), str(r.get("metric")),
                                     _rank(r.get("model"), focus["models"])))
    return {"perturbations": perts, "most_damaging": damaging, "shilling": _records(doc, "shilling")}


def _regression(metrics: dict[str, Any]) -> dict[str, Any]:
    """The comparison with the last release (metrics/regression.json), or why there is none."""
    doc = metrics.get("regression")
    if not doc or not doc.get("baseline"):
        why = ("no baseline configured (params.yaml `baseline` is null, so metrics/regression.json holds no "
               "comparison)" if doc else "no baseline configured (metrics/regression.json was not written)")
        return {"available": False, "reason": why, "verdict": None, "baseline": None,
                "accuracy": [], "gaps": [], "n_not_pass": 0}
    acc, gaps = _records(doc, "accuracy_change"), _records(doc, "gap_change")
    baseline = doc["baseline"]
    return {"available": True, "reason": "", "verdict": doc.get("verdict"),
            "baseline": baseline if isinstance(baseline, str) else json.dumps(baseline, sort_keys=True),
            "accuracy": acc, "gaps": gaps,
            "n_not_pass": sum(r.get("outcome") != "pass" for r in acc + gaps)}


TEST_GLOSSARY: tuple[dict[str, str], ...] = (
    {"anchor": "test-permutation", "name": "permutation test of a studentized statistic",
     "definition": "Group labels are shuffled and the statistic recomputed; for two groups the statistic is "
                   "Welch's t, for more Welch's F, so unequal variances and group sizes do not make the test "
                   "anti-conservative. p = (1 + b) / (1 + B) for b of B shuffles at least as extreme; its "
                   "Monte-Carlo bounds are p_mc_low to p_mc_high.",
     "reference": "Janssen, Stat. Probab. Letters 1997; Chung & Romano, Ann. Statist. 2013"},
    {"anchor": "test-bh", "name": "BH (Benjamini-Hochberg adjustment)",
     "definition": "Adjusts a family of p-values so that, among the tests called significant, the expected share "
                   "of false discoveries is at most alpha = 0.05; a gap 'survives' when its adjusted p is below 0.05.",
     "reference": "Benjamini & Hochberg, JRSS-B 1995"},
    {"anchor": "test-holm", "name": "Holm adjustment",
     "definition": "Step-down adjustment of the model comparisons' p-values that bounds the chance of any false "
                   "'wins' (family-wise error) at 0.05.", "reference": "Holm, Scand. J. Statist. 1979"},
    {"anchor": "interval-seeds", "name": "interval over training seeds",
     "definition": "95% Student-t interval of the per-seed means, with the task split fixed: how much the result "
                   "moves when only the training randomness changes.", "reference": "Henderson et al., AAAI 2018"},
    {"anchor": "interval-users", "name": "interval over seeds and users",
     "definition": "95% interval with both sources of variation: the evaluated users bootstrapped (one draw shared "
                   "by every seed and model, so comparisons stay paired) and the training seeds through the "
                   "t-spread of their means, with Satterthwaite degrees of freedom; what another sample of users "
                   "would see. Pooled metrics (AUC, coverage, Gini) have no per-user values and so no such "
                   "interval.", "reference": "Saravanan et al., NBDT 2020 (hierarchical resampling)"},
    {"anchor": "test-gap", "name": "group gap",
     "definition": "Largest minus smallest group value of a metric among groups of sufficient size, with a 95% "
                   "interval; tested by the permutation test, not by its interval, which a max - min biases away "
                   "from zero.", "reference": "fairlearn MetricFrame.difference"},
    {"anchor": "test-insufficient", "name": "insufficient group",
     "definition": "A group with fewer users than the minimum group size: its value is shown, marked, and never "
                   "counted as a finding; a gate on an insufficient record is inconclusive.",
     "reference": "params.yaml strata.min_group_size"},
    {"anchor": "test-inconclusive", "name": "inconclusive gate",
     "definition": "The gate's interval straddles its threshold (or its record is insufficient); on_inconclusive "
                   "decides whether that fails the release.", "reference": "audit/gate.py"},
)


def _glossary(metrics: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Every registered metric named anywhere in the audit's files, plus the tests and intervals."""
    names = {str(r.get("metric")) for doc in metrics.values() if isinstance(doc, dict)
             for r in (doc.get("records") or []) if isinstance(r, dict) and r.get("metric") is not None}
    names |= {m for s in ctx["accuracy"]["scenarios"] for m in s["metrics"]}
    # measures the report names as column headings rather than as a record's `metric`
    fa = ctx["fairness"]
    for present, shown in ((fa["exposure"], {"exposure_gini"}), (fa["ugf"], {"ugf"}),
                           (fa["miscalibration"], {"miscalibration"}),
                           (fa["counterfactual"], {"mean_abs_delta", "top10_jaccard", "delta_ndcg"}),
                           (ctx["robustness"]["shilling"], {"prediction_shift", "hit_ratio"})):
        names |= shown if present else set()
    return {"metrics": registry.glossary(n for n in names if registry.is_registered(n)),
            "unregistered": registry.unregistered(names), "tests": list(TEST_GLOSSARY)}


def _flatten(obj: Any, prefix: str = "") -> list[list[str]]:
    """Nested dict to sorted [dotted.key, text] rows (the environment fingerprint table)."""
    if isinstance(obj, dict):
        rows: list[list[str]] = []
        for k in sorted(obj, key=str):
            rows += _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
        return rows
    text = "n/a" if obj is None else json.dumps(obj) if isinstance(obj, (list, bool)) else str(obj)
    return [[prefix, text]]


def _reproducibility(root: Path, params: dict[str, Any], metrics: dict[str, Any], focus: dict[str, Any],
                     data: dict[str, Any]) -> dict[str, Any]:
    doc = metrics.get("reproducibility") or {}
    det = _records(doc, "determinism")
    spread = []
    for r in _records(metrics.get("summary"), "accuracy", scenario=focus["scenario"], metric=focus["metric"]):
        spread.append({"model": r.get("model"), "values": [v for v in (r.get("values") or [])],
                       "mean": _num(r.get("mean")), "std": _num(r.get("std")),
                       "ci_low": _num(r.get("ci_low")), "ci_high": _num(r.get("ci_high"))})
    spread.sort(key=lambda s: _rank(s["model"], focus["models"]))
    hashes: list[list[str]] = []
    if (root / "params.yaml").is_file():
        hashes.append(["params.yaml (now)", sha256_file(root / "params.yaml")])
    if data.get("checksum"):
        hashes.append(["data (canonical checksum)", str(data["checksum"])])
    for k, v in sorted((doc.get("hashes") or {}).items()):
        hashes.append([f"{k} (recorded by the pipeline)", str(v)])
    seeds = doc.get("seeds") or params.get("seeds") or []
    return {
        "seeds": [int(s) for s in seeds],
        "spread": spread,
        "determinism": det,
        "all_identical": (all(bool(r.get("identical")) for r in det) if det else None),
        "seed_variance": _records(doc, "seed_variance", scenario=focus["scenario"]),
        "environment": _flatten(doc.get("environment") or {}),
        "hashes": hashes,
    }


def _fmt(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def _findings(ctx: dict[str, Any]) -> list[str]:
    """The few sentences a reviewer reads first: each computed from the metrics, none canned."""
    f = ctx["focus"]
    out: list[str] = []
    v = ctx["verdict"]
    if v["available"]:
        failed = [g["name"] for g in v["gates"] if g["outcome"] == "fail"]
        open_ = [g["name"] for g in v["gates"] if g["outcome"] == "inconclusive"]
        out.append(f"{v['n_pass']} of {len(v['gates'])} release gates pass"
                   + (f"; failing: {', '.join(failed)}" if failed else "")
                   + (f"; inconclusive (the interval straddles the threshold, or the record is insufficient): "
                      f"{', '.join(open_)}" if open_ else "") + ".")
    for s in ctx["accuracy"]["scenarios"]:
        if s["scenario"] != f["scenario"]:
            continue
        wins = [c for c in s["comparisons"] if c.get("model") == f["model"] and c.get("metric") == f["metric"]]
        if wins:
            w = sum(c["winner"] == f["model"] for c in wins)
            lost = [c["baseline"] for c in wins if c["winner"] == c.get("baseline")]
            out.append(f"{f['scenario']} {f['metric']}: {f['model']} significantly beats {w} of {len(wins)} baselines "
                       f"after Holm correction" + (f" and loses to {', '.join(map(str, lost))}." if lost else "."))
        if s["summary"]:
            out.append(f"{f['scenario']}: {s['summary']}")
    if ctx["fairness"]["available"]:
        out.append(_fairness_finding(ctx["fairness"], f["model"], f["metric"]))
    dm = [d for d in ctx["robustness"]["most_damaging"] if d.get("model") == f["model"] and d.get("metric") == f["metric"]]
    if dm:
        d = max(dm, key=lambda d: abs(_num(d.get("delta")) or 0))
        out.append(f"Most damaging perturbation for {f['model']}: {d['perturbation']} at level {_fmt(d.get('level'))} "
                   f"changes {f['metric']} by {_fmt(d.get('delta'))}.")
    r = ctx["reproducibility"]
    if r["all_identical"] is not None:
        bad = [f"{d.get('model')}/seed{d.get('seed')}" for d in r["determinism"] if not d.get("identical")]
        out.append(f"Determinism: re-running gave identical predictions for all {len(r['determinism'])} checked runs."
                   if not bad else f"Determinism: {len(bad)} run(s) differ on re-run ({', '.join(bad[:5])}).")
    if ctx["signature"]["development_key"]:
        out.append("Signed with a local development key, not a release key: treat the signature as a checksum only.")
    return out


def model_description(name: str, params: dict[str, Any] | None = None) -> str:
    """What a model is, as its class states it (`description`); the report never words it itself."""
    from metarec.errors import ConfigError
    from metarec.models.registry import describe

    try:
        return describe(name, ((params or {}).get("model_params") or {}).get(name))
    except ConfigError as exc:
        raise ReportError(f"cannot describe model {name!r} in the model card: {exc}") from None


def data_description(data: dict[str, Any]) -> str:
    """One sentence on the data, built only from the `data` dict (data/prepared/meta.json)."""
    counts = data.get("counts") or {}
    rr = data.get("rating_range")
    parts = [f"{data.get('source') or UNRECORDED_SOURCE}: {counts.get('ratings', 'n/a')} ratings by "
             f"{counts.get('users', 'n/a')} users on {counts.get('items', 'n/a')} items"]
    if rr and all(_num(x) is not None for x in rr):
        parts.append(f"rated {rr[0]:g} to {rr[1]:g}")
    if data.get("user_attributes"):
        parts.append(f"user attributes {', '.join(data['user_attributes'])}")
    if data.get("item_features"):
        parts.append(f"item features {', '.join(data['item_features'])}")
    return "; ".join(parts) + "."


def _model_card(params: dict[str, Any], ctx: dict[str, Any]) -> dict[str, list[Any]]:
    f, data = ctx["focus"], ctx["data"]
    model = f["model"]
    hp = params.get(model) if isinstance(params.get(model), dict) else (params.get("model_params") or {}).get(model)
    others = [m for m in f["models"] if m != model]
    details: list[list[str]] = [["Model", str(model)],
                                ["Type", model_description(str(model), params)],
                                ["Software", f"metarec-audit {ctx['version']}"],
                                ["Seeds", ", ".join(str(s) for s in ctx["reproducibility"]["seeds"]) or "n/a"],
                                ["Compared against", ", ".join(others) or "none"]]
    details += [[f"Compared model: {m}", model_description(str(m), params)] for m in others]
    if isinstance(hp, dict) and hp:
        details.append(["Hyperparameters", ", ".join(f"{k}={json.dumps(v)}" for k, v in hp.items())])
    tasks = params.get("tasks") or {}
    src = data.get("source") or UNRECORDED_SOURCE
    sens = data.get("sensitive") or _ordered([g.get("attribute") for g in ctx["fairness"]["gaps"]], [])
    scen_rows = {s["scenario"]: s for s in data.get("scenarios", [])}
    eval_data = []
    for s in f["scenarios"]:
        row = scen_rows.get(s, {})
        eval_data.append(f"{s}: {row.get('n_users', 'n/a')} users, {row.get('n_ratings', 'n/a')} query+support ratings"
                         if row else f"{s}: sizes not recorded")
    train = scen_rows.get("train")
    rr = data.get("rating_range")
    scale = f" on the {rr[0]:g} to {rr[1]:g} scale" if rr and all(_num(x) is not None for x in rr) else ""
    quant = []
    for s in ctx["accuracy"]["scenarios"]:
        for row in s["rows"]:
            if row["model"] == model and row["cells"]:
                c = row["cells"][0]
                quant.append(f"{s['scenario']}: {s['metrics'][0]} {_fmt(c['mean'])} "
                             f"(95% interval over seeds and users {_fmt(c['ci_users_low'])} to "
                             f"{_fmt(c['ci_users_high'])}; over the {c['n_seeds']} training seeds alone, "
                             f"{_fmt(c['ci_low'])} to {_fmt(c['ci_high'])})")
    sig_gaps = [g for g in ctx["fairness"]["gaps"] if g["survives"]]
    cf = ctx["fairness"]["counterfactual"]
    ethical = [f"Sensitive attributes audited: {', '.join(sens) or 'none declared'}. Group sizes are in the Data "
               f"section; small groups have wide intervals."]
    ethical.append(f"{len(sig_gaps)} of {len(ctx['fairness']['gaps'])} group gaps for {model} survive the "
                   f"Benjamini-Hochberg adjustment (adjusted p < 0.05, groups of sufficient size); see Fairness."
                   if ctx["fairness"]["gaps"] else "No group gaps were recorded.")
    if cf:
        worst = max(cf, key=lambda r: _num(r.get("mean_abs_delta")) or 0)
        ethical.append(f"Counterfactual check: changing {worst.get('attribute')} moves predictions by up to "
                       f"{_fmt(worst.get('mean_abs_delta'))} rating points on average (group {worst.get('group')}).")
    caveats = [f"Results rest on {len(ctx['reproducibility']['seeds'])} seeds; intervals are over seeds and users "
               f"as recorded in the metrics files."]
    for s in ctx["accuracy"]["scenarios"]:
        losses = sorted({str(c["baseline"]) for c in s["comparisons"]
                         if c.get("model") == model and c["winner"] == c.get("baseline")})
        if losses:
            caveats.append(f"In {s['scenario']}, {model} is significantly worse than {', '.join(losses)}: "
                           f"prefer the baseline there.")
    if ctx["reproducibility"]["all_identical"] is False:
        caveats.append("Some runs are not bit-reproducible (see Reproducibility).")
    if ctx["signature"]["development_key"]:
        caveats.append("This report is signed with a development key.")
    return {
        "details": details,
        "intended_use": [f"Predicting ratings{scale} for users and items with few ratings (cold start) on {src}, "
                         f"and auditing that use: research and pre-release review of recommenders.",
                         "Out of scope: decisions about people, or data whose users differ from the "
                         "audited population, without a new audit."],
        "factors": [f"Sensitive user attributes: {', '.join(sens) or 'none declared'}.",
                    f"Cold-start scenarios: {', '.join(f['scenarios'])}"
                    + (f" (items released from {tasks['new_item_year']} on are new; "
                       f"{tasks.get('new_user_fraction')} of users are held out as new)." if tasks.get("new_item_year") else ".")],
        "metrics": [f"Accuracy: {len(_ordered([m for s in ctx['accuracy']['scenarios'] for m in s['metrics']], []))} "
                    f"metrics (defined in the Glossary); mean with 95% intervals over training seeds and over seeds and users (users resampled); "
                    f"paired comparisons over seeds and users with Holm-adjusted p-values.",
                    "Fairness: group gaps with intervals and permutation p-values (Benjamini-Hochberg adjusted), "
                    "user-group fairness (UGF), "
                    "parity of liked (rating >= 4) predictions, exposure (Gini, long-tail share), miscalibration.",
                    "Robustness: metric change under "
                    + (", ".join(p["name"] for p in ctx["robustness"]["perturbations"]) or "no recorded perturbation")
                    + (" and profile injection (shilling) attacks." if ctx["robustness"]["shilling"] else ".")],
        "evaluation_data": eval_data,
        "training_data": [data_description(data)]
                         + ([f"Training tasks: {train.get('n_tasks', 'n/a')} users with {train.get('n_ratings', 'n/a')} "
                             f"ratings (existing users, existing items)."] if train else []),
        "quantitative": quant,
        "ethical": ethical,
        "caveats": caveats,
    }


def _gate_metric(where: Any) -> str | None:
    """The metric a gate's record selector names (`metric=mae` in gate.json's text, or a mapping)."""
    if isinstance(where, dict):
        return str(where["metric"]) if where.get("metric") is not None else None
    found = re.search(r"(?:^|,\s*)metric=([^,]+)", str(where or ""))
    return found.group(1).strip() if found else None


def build_context(root: str | Path, params: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the template needs, as plain data (see the module docstring for the shape)."""
    from audit.feedback_report import feedback_context
    from audit.signing import signature_context
    from metarec import __version__

    root = Path(root)
    metrics = load_metrics(root)
    if metrics.get("summary") is None:
        raise ReportError("cannot render the report: metrics/summary.json is missing")
    if data is None:
        data = data_context_from_files(root, (metrics.get("summary") or {}).get("strata"))
    else:
        data = normalise_data(data)
    focus = _focus(params, metrics)
    gate_doc = metrics.get("gate")
    gates = [{**g, "outcome": g.get("outcome") or ("pass" if g.get("passed") else "fail")}
             for g in _records(gate_doc, "gate")]
    ctx: dict[str, Any] = {
        "title": f"Audit of {focus['model']} on {data.get('source') or (params.get('data') or {}).get('source', 'data')}",
        "version": __version__,
        "focus": focus,
        "verdict": {"available": gate_doc is not None, "passed": bool(gate_doc["passed"]) if gate_doc else None,
                    "n_pass": sum(g["outcome"] == "pass" for g in gates),
                    "n_fail": sum(not g.get("passed") for g in gates),
                    "n_inconclusive": sum(g["outcome"] == "inconclusive" for g in gates),
                    "gates": [{**{k: g.get(k) for k in ("name", "description", "field", "op", "threshold", "observed",
                                                        "outcome", "passed", "on_inconclusive", "message", "error",
                                                        "interval", "interval_low", "interval_high", "file", "where")},
                               "metric": _gate_metric(g.get("where"))}
                              for g in gates],
                    "findings": []},
        "data": data,
        "accuracy": _accuracy(metrics, focus),
        "fairness": _fairness(metrics, focus),
        "robustness": _robustness(metrics, focus),
        "regression": _regression(metrics),
        "feedback": feedback_context(root / "metrics" / "feedback.json"),
        "signature": signature_context(root, params),
    }
    ctx["glossary"] = _glossary(metrics, ctx)
    ctx["reproducibility"] = _reproducibility(root, params, metrics, focus, data)
    ctx["model_card"] = _model_card(params, ctx)
    ctx["verdict"]["findings"] = _findings(ctx)
    return ctx


def key_findings(root: str | Path, params: dict[str, Any]) -> list[str]:
    """The report's key findings, for the terminal (`metarec-audit summary`): the same sentences,
    from the same context, as the top of reports/audit.html."""
    return build_context(root, params)["verdict"]["findings"]


# ----------------------------------------------------------------------------- rendering
def _charts(ctx: dict[str, Any]) -> dict[str, Any]:
    f = ctx["focus"]
    out: dict[str, Any] = {"accuracy": {}, "gaps": Markup(""), "robustness": {}}
    for s in ctx["accuracy"]["scenarios"]:
        rows = [charts.ForestRow(label=f"{c['model']} − {c['baseline']}", estimate=_num(c.get("mean_diff")),
                                 low=_num(c.get("ci_low")), high=_num(c.get("ci_high")),
                                 note=f"Holm p {_fmt(c.get('p_holm'), 2)}", highlight=bool(c.get("significant")))
                for c in s["comparisons"] if c.get("metric") == f["metric"] and _num(c.get("mean_diff")) is not None]
        direction = "below 0 is better" if f["lower_is_better"] else "above 0 is better"
        out["accuracy"][s["scenario"]] = charts.forest_plot(
            rows, title=f"{s['scenario']}: {f['metric']} difference to baseline (95% interval over seeds and users)",
            x_label=f"model − baseline in {f['metric']} ({direction}); squares: significant after Holm")
    gaps = [charts.ForestRow(label=f"{g.get('scenario')} · {g.get('attribute')} · {g.get('metric')}",
                             estimate=_num(g.get("difference")), low=_num(g.get("diff_ci_low")),
                             high=_num(g.get("diff_ci_high")), note=f"BH p {_fmt(g.get('p_adjusted'), 2)}",
                             highlight=g["survives"])
            for g in ctx["fairness"]["gaps"] if _num(g.get("difference")) is not None]
    out["gaps"] = charts.forest_plot(gaps, title=f"{f['model']}: largest minus smallest group metric (95% interval)",
                                     x_label="gap between groups (squares: survives the BH adjustment)")
    for p in [p for p in ctx["robustness"]["perturbations"] if p["numeric"]]:
        overall = charts.line_chart([charts.Series(s["model"], tuple((x, y) for x, y in s["points"] if y is not None))
                                     for s in p["overall"]],
                                    title=f"{p['name']}: {f['metric']} by level, all users ({f['scenario']})",
                                    x_label="perturbation level", y_label=f["metric"], height=240)
        groups = [charts.line_chart([charts.Series(s["group"], tuple((x, y) for x, y in s["points"] if y is not None))
                                     for s in g["series"]],
                                    title=f"{p['name']}: {f['model']} by {g['attribute']}",
                                    x_label="perturbation level", y_label=f["metric"]) for g in p["by_group"]]
        out["robustness"][p["name"]] = {"overall": overall, "groups": groups}
    out["verdict_bar"] = charts.verdict_bar(ctx["verdict"]["n_pass"], len(ctx["verdict"]["gates"]) - ctx["verdict"]["n_pass"])
    return out


def _filter_num(x: Any, digits: int = 4) -> str:
    return _fmt(x, digits)


def _filter_p(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _filter_ci(lo: Any, hi: Any, digits: int = 4) -> str:
    a, b = _num(lo), _num(hi)
    return "" if a is None or b is None else f"[{a:.{digits}g}, {b:.{digits}g}]"


def _filter_value(x: Any) -> str:
    from audit.gate import format_value

    return format_value(x)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, extensions=["jinja2.ext.do"])
    env.filters.update(num=_filter_num, p=_filter_p, ci=_filter_ci, value=_filter_value, anchor=metric_anchor)
    return env


def render_report(context: dict[str, Any]) -> str:
    """HTML for the context; deterministic (same context, same bytes)."""
    try:
        template = environment().get_template("audit.html.j2")
        return template.render(ctx=context, charts=_charts(context))
    except jinja2.TemplateError as exc:
        raise ReportError(f"report template error: {exc}") from None


def write_report(root: str | Path, params: dict[str, Any], data: dict[str, Any] | None = None) -> Path:
    root = Path(root)
    from audit.signing import make_public

    html = render_report(build_context(root, params, data))
    return make_public(atomic_write_text(root / "reports" / "audit.html", html))
