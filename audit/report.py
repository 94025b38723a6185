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
- verdict: {available: bool, passed: bool|None, n_pass, n_fail, gates: [gate record], findings: [str]}
    gate record: {name, description, field, op, threshold, observed, passed, message, error,
    ci_low, ci_high, file, where} as in metrics/gate.json.
- model_card: {details: [[label, value]], intended_use, out_of_scope, factors, metrics,
    evaluation_data, training_data, quantitative, ethical, caveats}: each a list of sentences.
- data: {available: bool, source, path, checksum, files: [{name, sha256}],
    counts: {ratings, users, items}, rating_range: [min, max] | None, sensitive: [str],
    groups: [{attribute, group, n_users}], intersections: [{attributes, group, n_users}],
    scenarios: [{scenario, n_users, n_items, n_ratings, n_tasks}], top_items: [{item_id, title, n_ratings}]}
    Missing values may be None; the lead's pipeline may pass this dict directly (`data=`).
- accuracy: {scenarios: [{scenario, metrics: [str], rows: [{model, focal, cells: [{mean, ci_low,
    ci_high, n_seeds, best}]}], comparisons: [comparison record + winner], summary: str}]}
- fairness: {gaps: [gap records, focal model], gaps_all: [gap records, all models],
    groups: [{attribute, rows: [group_metric records]}], gap_to_rest, ugf, parity,
    counterfactual, exposure, miscalibration: [records]}
- robustness: {perturbations: [{name, overall: [{model, points: [[level, value]]}],
    by_group: [{attribute, series: [{group, points}]}]}], most_damaging: [records], shilling: [records]}
- reproducibility: {seeds: [int], spread: [{model, values, mean, std, ci_low, ci_high}],
    determinism: [records], all_identical: bool|None, seed_variance: [records],
    environment: [[key, value]], hashes: [[name, sha256]]}
- signature: audit.signing.signature_context(...) (keyid, fingerprint, development_key,
    key_source, public_key_pem, subjects, bundle, public_key_path, payload_type)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import jinja2
from markupsafe import Markup

from audit import charts
from metarec.errors import MetarecError
from metarec.io import atomic_write_text, sha256_file

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "reports" / "templates"
SCENARIO_ORDER = ("warm", "user_cold", "item_cold", "user_item_cold", "val")
META_LEARNERS = ("melu", "ensemble", "finetune")
METRIC_FILES = ("summary", "fairness", "robustness", "reproducibility", "gate")
MODEL_DESCRIPTIONS = {
    "melu": "MeLU, a meta-learned user preference estimator (Lee et al., KDD 2019): attribute embeddings "
            "feed dense decision layers that are adapted to each user on their support ratings (MAML-style).",
    "ensemble": "an ensemble of meta-learned MeLU models",
    "finetune": "a globally trained network fine-tuned on each user's support ratings (non-meta baseline)",
    "global": "one global network without per-user adaptation",
    "mean": "each item's mean rating", "bias": "global mean plus user and item biases",
    "pop": "item popularity", "itemknn": "item-based k-nearest neighbours", "svd": "matrix factorisation (SVD)",
}


class ReportError(MetarecError):
    """The report cannot be rendered (missing metrics, template error)."""


def lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return m.startswith(("mae", "rmse", "mse", "miscal", "loss"))


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
        "files": [{"name": k, "sha256": v} for k, v in sorted((prov.get("files") or {}).items())],
        "counts": {k: meta["counts"].get(k) for k in ("ratings", "users", "items")},
        "rating_range": [spec["rating_min"], spec["rating_max"]],
        "sensitive": [str(x) for x in spec["sensitive"]],
        "groups": groups, "intersections": inter, "scenarios": scenarios, "top_items": top,
    }


DATA_DEFAULTS: dict[str, Any] = {
    "available": True, "source": None, "path": None, "checksum": None, "files": [], "rating_range": None,
    "sensitive": [], "groups": [], "intersections": [], "scenarios": [], "top_items": [],
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


def _accuracy(metrics: dict[str, Any], focus: dict[str, Any]) -> dict[str, Any]:
    acc = _records(metrics.get("summary"), "accuracy")
    comp = _records(metrics.get("summary"), "comparison")
    out = []
    for scenario in focus["scenarios"]:
        recs = [r for r in acc if r.get("scenario") == scenario]
        mnames = _ordered([r.get("metric") for r in recs], (focus["metric"],))
        best: dict[str, str] = {}
        for m in mnames:
            cand = [r for r in recs if r.get("metric") == m and _num(r.get("mean")) is not None]
            if cand:
                pick = (min if lower_is_better(m) else max)(cand, key=lambda r: r["mean"])
                best[m] = pick["model"]
        rows = []
        for model in _ordered([r.get("model") for r in recs], focus["models"]):
            cells = []
            for m in mnames:
                r = next((x for x in recs if x.get("model") == model and x.get("metric") == m), {})
                cells.append({"mean": _num(r.get("mean")), "ci_low": _num(r.get("ci_low")),
                              "ci_high": _num(r.get("ci_high")), "n_seeds": r.get("n_seeds"),
                              "best": best.get(m) == model})
            rows.append({"model": model, "focal": model == focus["model"], "cells": cells})
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
        if fm in best:
            focal = next((x for x in recs if x.get("model") == focus["model"] and x.get("metric") == fm), None)
            summary = f"Best {fm}: {best[fm]}"
            if focal and best[fm] != focus["model"] and _num(focal.get("mean")) is not None:
                summary += f"; {focus['model']} scores {focal['mean']:.4f}"
            summary += "."
        out.append({"scenario": scenario, "metrics": mnames, "rows": rows, "comparisons": comps, "summary": summary})
    return {"scenarios": out}


def _fairness(metrics: dict[str, Any], focus: dict[str, Any]) -> dict[str, Any]:
    """Fairness tables for the report. ``gaps`` holds only gaps between groups of sufficient size
    (what charts, findings and the model card may quote); ``gaps_insufficient`` lists the rest."""
    doc = metrics.get("fairness")
    fm, fs, fmet = focus["model"], focus["scenario"], focus["metric"]
    gaps_all = _records(doc, "gap")
    gaps = sorted([g for g in gaps_all if g.get("model") == fm], key=lambda r: (
        focus["scenarios"].index(r["scenario"]) if r.get("scenario") in focus["scenarios"] else 99,
        str(r.get("metric")), str(r.get("attribute"))))
    gm = _records(doc, "group_metric", model=fm, scenario=fs, metric=fmet)
    groups = [{"attribute": a, "rows": [r for r in gm if r.get("attribute") == a]}
              for a in _ordered([r.get("attribute") for r in gm], [])]
    tests = [r for r in (doc or {}).get("records", []) if r.get("model") == fm and r.get("p_adjusted") is not None]
    return {
        "available": doc is not None,
        "gaps": [g for g in gaps if not g.get("insufficient")],
        "gaps_insufficient": [g for g in gaps if g.get("insufficient")],
        "gaps_all": [g for g in gaps_all if g.get("scenario") == fs and not g.get("insufficient")],
        "groups": groups,
        "gap_to_rest": _records(doc, "gap_to_rest", model=fm, scenario=fs),
        "ugf": _records(doc, "ugf", model=fm),
        "parity": _records(doc, "parity", model=fm, scenario=fs),
        "counterfactual": _records(doc, "counterfactual", model=fm, scenario=fs),
        "exposure": _records(doc, "exposure", scenario=fs),
        "miscalibration": _records(doc, "miscalibration", model=fm, scenario=fs),
        "tests": tests,
        "survivors": [r for r in tests if r.get("significant")],
        "min_group_size": (doc or {}).get("min_group_size"),
        "alpha": (doc or {}).get("alpha", 0.05),
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
    doc = metrics.get("robustness")
    curves = _records(doc, "curve", scenario=focus["scenario"], metric=focus["metric"])
    perts = []
    for name in _ordered([r.get("perturbation") for r in curves], []):
        rs = [r for r in curves if r.get("perturbation") == name]
        overall = []
        for model in _ordered([r.get("model") for r in rs], focus["models"]):
            pts = sorted((float(r["level"]), _num(r.get("value"))) for r in rs
                         if r.get("model") == model and r.get("attribute") == "all" and _num(r.get("level")) is not None)
            overall.append({"model": model, "points": [list(p) for p in pts]})
        by_group = []
        focal = [r for r in rs if r.get("model") == focus["model"] and r.get("attribute") != "all"]
        for attr in _ordered([r.get("attribute") for r in focal], []):
            ar = [r for r in focal if r.get("attribute") == attr]
            sizes: dict[str, float] = {}
            for r in ar:
                sizes[str(r.get("group"))] = max(sizes.get(str(r.get("group")), 0), _num(r.get("n")) or 0)
            keep = sorted(sizes, key=lambda g: (-sizes[g], g))[:MAX_GROUP_LINES]
            series = [{"group": g, "points": [list(p) for p in sorted(
                (float(r["level"]), _num(r.get("value"))) for r in ar
                if str(r.get("group")) == g and _num(r.get("level")) is not None)]} for g in keep]
            by_group.append({"attribute": attr, "series": series, "omitted": max(0, len(sizes) - len(keep))})
        perts.append({"name": name, "overall": overall, "by_group": by_group})
    damaging = sorted(_records(doc, "most_damaging", scenario=focus["scenario"]),
                      key=lambda r: (str(r.get("perturbation")), str(r.get("metric")),
                                     _rank(r.get("model"), focus["models"])))
    return {"perturbations": perts, "most_damaging": damaging, "shilling": _records(doc, "shilling")}


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
        failed = [g["name"] for g in v["gates"] if not g["passed"]]
        out.append(f"{v['n_pass']} of {v['n_pass'] + v['n_fail']} release gates pass"
                   + (f"; failing: {', '.join(failed)}." if failed else "."))
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


def _model_card(params: dict[str, Any], ctx: dict[str, Any]) -> dict[str, list[Any]]:
    f, data = ctx["focus"], ctx["data"]
    model = f["model"]
    hp = params.get(model) if isinstance(params.get(model), dict) else (params.get("model_params") or {}).get(model)
    details: list[list[str]] = [["Model", str(model)],
                                ["Type", MODEL_DESCRIPTIONS.get(str(model), "a recommender configured in params.yaml")],
                                ["Software", f"metarec-audit {ctx['version']}"],
                                ["Seeds", ", ".join(str(s) for s in ctx["reproducibility"]["seeds"]) or "n/a"],
                                ["Compared against", ", ".join(m for m in f["models"] if m != model) or "none"]]
    if isinstance(hp, dict) and hp:
        details.append(["Hyperparameters", ", ".join(f"{k}={json.dumps(v)}" for k, v in hp.items())])
    tasks = params.get("tasks") or {}
    src = data.get("source") or (params.get("data") or {}).get("source") or "the configured data source"
    sens = data.get("sensitive") or _ordered([g.get("attribute") for g in ctx["fairness"]["gaps"]], [])
    scen_rows = {s["scenario"]: s for s in data.get("scenarios", [])}
    eval_data = []
    for s in f["scenarios"]:
        row = scen_rows.get(s, {})
        eval_data.append(f"{s}: {row.get('n_users', 'n/a')} users, {row.get('n_ratings', 'n/a')} query+support ratings"
                         if row else f"{s}: sizes not recorded")
    train = scen_rows.get("train")
    counts = data.get("counts") or {}
    rr = data.get("rating_range")
    scale = f" on the {rr[0]:g} to {rr[1]:g} scale" if rr and all(_num(x) is not None for x in rr) else ""
    quant = []
    for s in ctx["accuracy"]["scenarios"]:
        for row in s["rows"]:
            if row["model"] == model and row["cells"]:
                c = row["cells"][0]
                quant.append(f"{s['scenario']}: {s['metrics'][0]} {_fmt(c['mean'])} "
                             f"(95% interval {_fmt(c['ci_low'])} to {_fmt(c['ci_high'])}, {c['n_seeds']} seeds)")
    sig_gaps = [g for g in ctx["fairness"]["gaps"] if (_num(g.get("p_value")) or 1) < 0.05]
    cf = ctx["fairness"]["counterfactual"]
    ethical = [f"Sensitive attributes audited: {', '.join(sens) or 'none declared'}. Group sizes are in the Data "
               f"section; small groups have wide intervals."]
    ethical.append(f"{len(sig_gaps)} of {len(ctx['fairness']['gaps'])} group gaps for {model} have p < 0.05 "
                   f"(unadjusted); see Fairness." if ctx["fairness"]["gaps"] else "No group gaps were recorded.")
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
        "metrics": [f"Accuracy: {', '.join(_ordered([m for s in ctx['accuracy']['scenarios'] for m in s['metrics']], []))}; "
                    f"mean and 95% interval over seeds; paired comparisons with Holm-adjusted p-values.",
                    "Fairness: group gaps with intervals and permutation p-values, user-group fairness (UGF), "
                    "parity of liked (rating >= 4) predictions, exposure (Gini, long-tail share), miscalibration.",
                    "Robustness: metric change under "
                    + (", ".join(p["name"] for p in ctx["robustness"]["perturbations"]) or "no recorded perturbation")
                    + (" and profile injection (shilling) attacks." if ctx["robustness"]["shilling"] else ".")],
        "evaluation_data": eval_data,
        "training_data": [f"{src}: {counts.get('ratings', 'n/a')} ratings by {counts.get('users', 'n/a')} users on "
                          f"{counts.get('items', 'n/a')} items in total."]
                         + ([f"Training tasks: {train.get('n_tasks', 'n/a')} users with {train.get('n_ratings', 'n/a')} "
                             f"ratings (existing users, existing items)."] if train else []),
        "quantitative": quant,
        "ethical": ethical,
        "caveats": caveats,
    }


def build_context(root: str | Path, params: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the template needs, as plain data (see the module docstring for the shape)."""
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
    gates = _records(gate_doc, "gate")
    ctx: dict[str, Any] = {
        "title": f"Audit of {focus['model']} on {data.get('source') or (params.get('data') or {}).get('source', 'data')}",
        "version": __version__,
        "focus": focus,
        "verdict": {"available": gate_doc is not None, "passed": bool(gate_doc["passed"]) if gate_doc else None,
                    "n_pass": sum(bool(g.get("passed")) for g in gates),
                    "n_fail": sum(not g.get("passed") for g in gates),
                    "gates": [{k: g.get(k) for k in ("name", "description", "field", "op", "threshold", "observed",
                                                     "passed", "message", "error", "ci_low", "ci_high", "file", "where")}
                              for g in gates],
                    "findings": []},
        "data": data,
        "accuracy": _accuracy(metrics, focus),
        "fairness": _fairness(metrics, focus),
        "robustness": _robustness(metrics, focus),
        "signature": signature_context(root, params),
    }
    ctx["reproducibility"] = _reproducibility(root, params, metrics, focus, data)
    ctx["model_card"] = _model_card(params, ctx)
    ctx["verdict"]["findings"] = _findings(ctx)
    return ctx


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
            rows, title=f"{s['scenario']}: {f['metric']} difference to baseline (95% interval)",
            x_label=f"model − baseline in {f['metric']} ({direction}); squares: significant after Holm")
    gaps = [charts.ForestRow(label=f"{g.get('scenario')} · {g.get('attribute')} · {g.get('metric')}",
                             estimate=_num(g.get("difference")), low=_num(g.get("diff_ci_low")),
                             high=_num(g.get("diff_ci_high")), note=f"p {_fmt(g.get('p_value'), 2)}",
                             highlight=(_num(g.get("p_value")) or 1) < 0.05)
            for g in ctx["fairness"]["gaps"] if _num(g.get("difference")) is not None]
    out["gaps"] = charts.forest_plot(gaps, title=f"{f['model']}: largest minus smallest group metric (95% interval)",
                                     x_label="gap between groups (squares: p < 0.05)")
    for p in ctx["robustness"]["perturbations"]:
        overall = charts.line_chart([charts.Series(s["model"], tuple((x, y) for x, y in s["points"] if y is not None))
                                     for s in p["overall"]],
                                    title=f"{p['name']}: {f['metric']} by level, all users ({f['scenario']})",
                                    x_label="perturbation level", y_label=f["metric"])
        groups = [charts.line_chart([charts.Series(s["group"], tuple((x, y) for x, y in s["points"] if y is not None))
                                     for s in g["series"]],
                                    title=f"{p['name']}: {f['model']} by {g['attribute']}",
                                    x_label="perturbation level", y_label=f["metric"]) for g in p["by_group"]]
        out["robustness"][p["name"]] = {"overall": overall, "groups": groups}
    out["verdict_bar"] = charts.verdict_bar(ctx["verdict"]["n_pass"], ctx["verdict"]["n_fail"])
    return out


def _filter_num(x: Any, digits: int = 4) -> str:
    return _fmt(x, digits)


def _filter_p(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _filter_ci(lo: Any, hi: Any) -> str:
    a, b = _num(lo), _num(hi)
    return "" if a is None or b is None else f"[{a:.4g}, {b:.4g}]"


def _filter_value(x: Any) -> str:
    from audit.gate import format_value

    return format_value(x)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(num=_filter_num, p=_filter_p, ci=_filter_ci, value=_filter_value)
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
