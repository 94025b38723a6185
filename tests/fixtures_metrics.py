"""A realistic, small audit project on disk, for the gate, signing, report and browser tests.

Why a writer instead of checked-in files: the tests need variants (a failing gate, hostile group
names, a missing input) and each test must own its copy in `tmp_path`, because signing and
verification tests tamper with the files. Values come from a seeded generator, so every call with
the same arguments writes byte-identical files.

The shapes follow docs/DESIGN.md ("Metrics files") and CONTRACTS.md ("Files the pipeline writes").
"""

from __future__ import annotations

import atexit
import math
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from metarec.io import atomic_write_bytes, atomic_write_json, atomic_write_parquet, atomic_write_text

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror=alert(1)>'

MODELS = ("melu", "finetune", "mean", "pop", "svd")
SEEDS = (0, 1, 2)
SCENARIOS = ("warm", "user_cold", "item_cold", "user_item_cold")
METRICS = ("mae", "ndcg@3")
# Metrics of summary.json beyond METRICS, as the pipeline writes them (catalogue nDCG is `list_ndcg@10`);
# drawn from their own generator so that adding one leaves every other fixture value unchanged.
EXTRA_METRICS = ("mse", "rmse", "n_query", "ndcg@1", "ndcg@5", "list_ndcg@10", "precision@10", "recall@10",
                 "auc", "arp", "aplt", "novelty", "diversity", "coverage", "gini")
FAIRNESS_METRICS = ("mae", "ndcg@3", "list_ndcg@10")
MIN_GROUP_SIZE = 10
# Group sizes loosely follow ML-100K's user table (943 users).
ATTRIBUTES: dict[str, dict[str, int]] = {
    "gender": {"F": 273, "M": 670},
    "age": {"<18": 54, "18-24": 214, "25-34": 346, "35-44": 171, "45-49": 67, "50-55": 53, "56+": 38},
    "occupation": {"student": 196, "other": 105, "educator": 95, "engineer": 67, "programmer": 66,
                   "lawyer": 12, "doctor": 7, "homemaker": 7, "none": 9},
}
BASE_MAE = {"melu": 0.80, "finetune": 0.82, "mean": 0.94, "pop": 0.98, "svd": 0.79}
SCENARIO_PENALTY = {"warm": 0.0, "user_cold": 0.05, "item_cold": 0.11, "user_item_cold": 0.14}
PERTURBATIONS = ("rating_noise", "support_dropout")
SHIFT_LEVELS = ("none", "F=0.5,M=0.5")   # demographic_shift: levels are group mixes, not numbers
LEVELS = (0.0, 0.1, 0.2, 0.4)


def _params(gates_pass: bool) -> dict[str, Any]:
    gap_threshold = 0.25 if gates_pass else 0.01
    return {
        "data": {"source": "movielens-100k", "path": None},
        "seeds": list(SEEDS),
        "models": list(MODELS),
        "tasks": {"new_item_year": 1998, "new_user_fraction": 0.2, "val_fraction": 0.1, "query_size": 10,
                  "min_ratings": 13, "max_ratings": 100},
        "melu": {"embedding_dim": 32, "hidden": [64, 64], "local_lr": 5.0e-6, "global_lr": 5.0e-5,
                 "local_steps": 1, "batch_size": 32, "epochs": 20},
        "signing": {"key_path": "keys/signing.key"},
        "gates": [
            {"name": "melu_not_worse_than_mean_user_cold", "file": "summary",
             "where": {"kind": "comparison", "model": "melu", "baseline": "mean", "scenario": "user_cold", "metric": "mae"},
             "field": "mean_diff", "op": "<=", "threshold": 0.0,
             "description": "MeLU's cold-user MAE is no worse than predicting each item's mean."},
            {"name": "gender_mae_gap_upper", "file": "fairness",
             "where": {"kind": "gap", "model": "melu", "scenario": "user_cold", "attribute": "gender", "metric": "mae"},
             "field": "diff_ci_high", "op": "<=", "threshold": gap_threshold,
             "description": "Upper 95% bound of the MAE gap between genders for cold users."},
            {"name": "melu_deterministic_seed0", "file": "reproducibility",
             "where": {"kind": "determinism", "model": "melu", "seed": 0},
             "field": "identical", "op": "==", "threshold": True},
            {"name": "rating_noise_damage", "file": "robustness",
             "where": {"kind": "most_damaging", "perturbation": "rating_noise", "model": "melu", "scenario": "user_cold", "metric": "mae"},
             "field": "delta", "op": "<", "threshold": 0.5},
        ],
    }


def _ci(rng: random.Random, mean: float, spread: float) -> tuple[float, float]:
    half = spread * (0.8 + 0.4 * rng.random())
    return round(mean - half, 6), round(mean + half, 6)


def _accuracy_record(model: str, scenario: str, metric: str, values: list[float]) -> dict[str, Any]:
    """An accuracy record in summary.json's shape: mean, Student-t interval over seeds, and a wider
    interval over seeds and users (null for pooled metrics, as the pipeline writes them)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = 4.303 * std / math.sqrt(len(values))
    pooled = metric in ("auc", "coverage", "gini")
    users_half = max(2.0 * half, 0.004 * max(abs(mean), 1.0))
    return {"kind": "accuracy", "model": model, "scenario": scenario, "metric": metric,
            "mean": round(mean, 6), "std": round(std, 6), "ci_low": round(mean - half, 6),
            "ci_high": round(mean + half, 6),
            "ci_users_low": None if pooled else round(mean - users_half, 6),
            "ci_users_high": None if pooled else round(mean + users_half, 6),
            "interval": "95% Student-t interval over training seeds",
            "interval_users": ("not available: a pooled metric has no per-user values to resample" if pooled
                               else "95% interval over seeds and users"),
            "n_seeds": len(values), "values": values}


def _extra_values(rng: random.Random, model: str, scenario: str, metric: str) -> list[float]:
    """Per-seed values of EXTRA_METRICS; constant where the pipeline's are constant by construction
    (query size; in item_cold every candidate is new, so APLT = 1 and ARP = 0)."""
    base = BASE_MAE[model] + SCENARIO_PENALTY[scenario]
    if metric == "n_query":
        return [10.0] * len(SEEDS)
    if scenario == "item_cold" and metric in ("aplt", "arp"):
        return [1.0 if metric == "aplt" else 0.0] * len(SEEDS)
    centre = {"mse": base ** 2 * 1.6, "rmse": base * 1.26, "ndcg@1": 1.2 - base * 0.6, "ndcg@5": 1.35 - base * 0.6,
              "list_ndcg@10": 0.5 - base * 0.4, "precision@10": 0.3 - base * 0.2, "recall@10": 0.35 - base * 0.2,
              "auc": 1.2 - base * 0.6, "arp": 120.0 + base * 60, "aplt": 0.2 + (1 - base) * 0.3,
              "novelty": 8.0 + base * 2, "diversity": 0.6 + base * 0.1, "coverage": 0.5 - base * 0.3,
              "gini": 0.5 + base * 0.3}[metric]
    return [centre + rng.gauss(0, 0.004 * max(1.0, abs(centre))) for _ in SEEDS]


def _summary(rng: random.Random) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    means: dict[tuple[str, str, str], float] = {}
    for scenario in SCENARIOS:
        for model in MODELS:
            for metric in METRICS:
                base = BASE_MAE[model] + SCENARIO_PENALTY[scenario]
                centre = base if metric == "mae" else max(0.5, 1.33 - base * 0.6)
                values = [round(centre + rng.gauss(0, 0.006), 6) for _ in SEEDS]
                means[(scenario, model, metric)] = sum(values) / len(values)
                records.append(_accuracy_record(model, scenario, metric, values))
    extra = random.Random(7)
    for scenario in SCENARIOS:
        for model in MODELS:
            for metric in EXTRA_METRICS:
                records.append(_accuracy_record(model, scenario, metric,
                                                [round(v, 6) for v in _extra_values(extra, model, scenario, metric)]))
    raw: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        for model in MODELS:
            if model == "mean":
                continue
            for metric in METRICS:
                diff = means[(scenario, model, metric)] - means[(scenario, "mean", metric)]
                lo, hi = _ci(rng, diff, 0.012)
                p = 1e-6 if abs(diff) > 0.03 else round(0.2 + 0.5 * rng.random(), 4)
                raw.append({"kind": "comparison", "scenario": scenario, "metric": metric, "model": model,
                            "baseline": "mean", "mean_diff": round(diff, 6), "ci_low": lo, "ci_high": hi,
                            "p_value": p, "effect_size": round(diff / 0.05, 4), "n_users": 180})
    m = len(raw)
    for rank, rec in enumerate(sorted(raw, key=lambda r: r["p_value"])):
        rec["p_holm"] = min(1.0, round(rec["p_value"] * (m - rank), 6))
        lower_is_better = rec["metric"] == "mae"
        sig = rec["p_holm"] < 0.05
        model_better = (rec["mean_diff"] < 0) == lower_is_better
        rec["significant"] = sig
        rec["better"] = ("model" if model_better else "baseline") if sig else "tie"
    return {"records": records + raw}


def _fairness(rng: random.Random, hostile: bool) -> dict[str, Any]:
    """fairness.json in the statistics contract: groups below MIN_GROUP_SIZE are `insufficient`,
    every test carries `p_adjusted` (Benjamini-Hochberg within its family, via scipy) and the
    age MAE gap of melu and svd is planted large enough to survive the adjustment."""
    from scipy.stats import false_discovery_control

    attributes = {k: dict(v) for k, v in ATTRIBUTES.items()}
    if hostile:
        attributes["occupation"][XSS_SCRIPT] = 12
        attributes["occupation"][XSS_IMG] = 9
    records: list[dict[str, Any]] = []
    for model in MODELS:
        for scenario in SCENARIOS:
            for metric in FAIRNESS_METRICS:
                for attr, groups in attributes.items():
                    values = {}
                    for group, n in groups.items():
                        centre = BASE_MAE[model] + SCENARIO_PENALTY[scenario] + rng.gauss(0, 0.03)
                        if attr == "age" and metric == "mae" and model in ("melu", "svd") and group == "<18":
                            centre += 0.12
                        if metric != "mae":
                            centre = 1.33 - centre * 0.6
                        lo, hi = _ci(rng, centre, 0.6 / math.sqrt(n))
                        values[group] = centre
                        records.append({"kind": "group_metric", "model": model, "scenario": scenario,
                                        "attribute": attr, "group": group, "metric": metric, "value": round(centre, 6),
                                        "ci_low": lo, "ci_high": hi, "n": n, "merged": False,
                                        "insufficient": n < MIN_GROUP_SIZE})
                    tested = {g: v for g, v in values.items() if groups[g] >= MIN_GROUP_SIZE}
                    gmax = max(tested, key=tested.get)
                    gmin = min(tested, key=tested.get)
                    diff = tested[gmax] - tested[gmin]
                    lo, hi = _ci(rng, diff, 0.05)
                    p = round(min(1.0, 0.002 + rng.random() * 0.6), 4)
                    if attr == "age" and metric == "mae" and model in ("melu", "svd"):
                        p = 0.0001
                    records.append({"kind": "gap", "model": model, "scenario": scenario, "attribute": attr,
                                    "metric": metric, "difference": round(diff, 6), "diff_ci_low": max(0.0, lo),
                                    "diff_ci_high": hi, "interval": "95% bootstrap interval over seeds and users",
                                    "ratio": round(tested[gmax] / tested[gmin], 6), "p_value": p,
                                    "p_mc_low": max(0.0, round(p - 0.005, 4)), "p_mc_high": round(min(1.0, p + 0.005), 4),
                                    "max_group": gmax, "min_group": gmin, "n_groups": len(tested),
                                    "n": sum(groups[g] for g in tested), "statistic": "welch_f",
                                    "n_permutations": 7600, "seeds": list(SEEDS), "insufficient": False})
                    worst = gmax if metric == "mae" else gmin
                    rest = round(values[worst] - sum(values.values()) / len(values), 6)
                    lo, hi = _ci(rng, rest, 0.04)
                    records.append({"kind": "gap_to_rest", "model": model, "scenario": scenario, "attribute": attr,
                                    "metric": metric, "group": worst, "gap": rest, "ci_low": lo, "ci_high": hi,
                                    "p_value": round(rng.random() * 0.5, 4), "n": groups[worst],
                                    "insufficient": groups[worst] < MIN_GROUP_SIZE})
                ugf = abs(rng.gauss(0.02, 0.01))
                lo, hi = _ci(rng, ugf, 0.02)
                records.append({"kind": "ugf", "model": model, "scenario": scenario, "metric": metric,
                                "advantaged": round(0.78 + rng.random() * 0.05, 6),
                                "disadvantaged": round(0.80 + rng.random() * 0.05, 6), "ugf": round(ugf, 6),
                                "ci_low": lo, "ci_high": hi, "p_value": round(rng.random(), 4)})
            for attr in attributes:
                for pmetric in ("demographic_parity_difference", "equalized_odds_difference"):
                    records.append({"kind": "parity", "model": model, "scenario": scenario, "attribute": attr,
                                    "metric": pmetric, "value": round(abs(rng.gauss(0.05, 0.03)), 6),
                                    "p_value": round(rng.random(), 4)})
                for group in attributes[attr]:
                    records.append({"kind": "miscalibration", "model": model, "scenario": scenario,
                                    "attribute": attr, "group": group, "value": round(0.3 + rng.random() * 0.4, 6),
                                    "n": attributes[attr][group]})
                    records.append({"kind": "counterfactual", "model": model, "scenario": scenario,
                                    "attribute": attr, "group": group,
                                    "mean_abs_delta": round(abs(rng.gauss(0.02, 0.01)), 6),
                                    "top10_jaccard": round(0.7 + rng.random() * 0.3, 6),
                                    "delta_ndcg": round(rng.gauss(0, 0.01), 6), "rank": 1})
            records.append({"kind": "exposure", "model": model, "scenario": scenario,
                            "short_head_share": round(0.5 + rng.random() * 0.4, 6),
                            "long_tail_share": round(0.1 + rng.random() * 0.3, 6),
                            "exposure_gini": round(0.6 + rng.random() * 0.35, 6)})
    # Benjamini-Hochberg within each model's family of tests of one kind
    for kind in ("gap", "gap_to_rest", "ugf", "parity"):
        for model in MODELS:
            family = [r for r in records if r["kind"] == kind and r["model"] == model]
            adjusted = false_discovery_control([r["p_value"] for r in family], method="bh")
            for r, q in zip(family, adjusted):
                r.update(p_adjusted=round(float(q), 6), adjustment="BH", family=f"{kind} tests of {model}")
                if kind == "gap":
                    r["significant"] = r["p_adjusted"] < 0.05
    return {"records": records, "min_group_size": MIN_GROUP_SIZE}


def _robustness(rng: random.Random, hostile: bool) -> dict[str, Any]:
    attributes = {k: dict(v) for k, v in ATTRIBUTES.items()}
    if hostile:
        attributes["gender"][XSS_SCRIPT] = 3
    records: list[dict[str, Any]] = []
    for perturbation in PERTURBATIONS:
        for model in MODELS:
            for scenario in SCENARIOS:
                for metric in METRICS:
                    clean = BASE_MAE[model] + SCENARIO_PENALTY[scenario]
                    if metric != "mae":
                        clean = 1.33 - clean * 0.6
                    slope = (0.35 if model in ("melu", "finetune") else 0.2) * (1 if metric == "mae" else -0.5)
                    worst = (LEVELS[-1], 0.0)
                    targets: list[tuple[str, str, int]] = [("all", "all", 1200)]
                    targets += [(a, g, n) for a, gs in attributes.items() for g, n in gs.items()]
                    for attr, group, n in targets:
                        offset = 0.0 if attr == "all" else rng.gauss(0, 0.02)
                        for level in LEVELS:
                            value = clean + offset + slope * level * (1 + rng.random() * 0.1)
                            delta = value - (clean + offset)
                            records.append({"kind": "curve", "perturbation": perturbation, "model": model,
                                            "scenario": scenario, "metric": metric, "level": level,
                                            "attribute": attr, "group": group, "value": round(value, 6),
                                            "delta": round(delta, 6), "n": n})
                            if attr == "all" and abs(delta) >= abs(worst[1]):
                                worst = (level, delta)
                    records.append({"kind": "most_damaging", "perturbation": perturbation, "model": model,
                                    "scenario": scenario, "metric": metric, "level": worst[0],
                                    "delta": round(worst[1], 6)})
    shift = random.Random(11)
    for model in MODELS:
        clean = BASE_MAE[model] + SCENARIO_PENALTY["user_cold"]
        for level in SHIFT_LEVELS:
            delta = 0.0 if level == "none" else round(shift.gauss(0.01, 0.005), 6)
            records.append({"kind": "curve", "perturbation": "demographic_shift", "model": model,
                            "scenario": "user_cold", "metric": "mae", "level": level, "attribute": "all",
                            "group": "all", "value": round(clean + delta, 6), "delta": delta, "n": 180})
    for model in MODELS:
        for strategy in ("random", "average", "bandwagon"):
            for fraction in (0.01, 0.05):
                records.append({"kind": "shilling", "model": model, "strategy": strategy, "fraction": fraction,
                                "n_fake": int(943 * fraction), "prediction_shift": round(rng.random() * 0.6 * fraction * 20, 6),
                                "hit_ratio": round(0.05 + rng.random() * 0.2, 6), "hit_ratio_clean": 0.04})
    return {"records": records}


def _reproducibility(rng: random.Random, deterministic: bool) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    for model in MODELS:
        for seed in SEEDS:
            same = deterministic or model != "melu"
            records.append({"kind": "determinism", "model": model, "seed": seed, "identical": same,
                            "max_abs_diff": 0.0 if same else 3.1e-7})
        for scenario in SCENARIOS:
            for metric in METRICS:
                share = round(rng.random() * 0.05, 6)
                records.append({"kind": "seed_variance", "model": model, "scenario": scenario, "metric": metric,
                                "between_seed_share": share, "between_user_share": round(1 - share, 6)})
    return {
        "records": records,
        "seeds": list(SEEDS),
        "environment": {"python": "3.11.7", "platform": "Linux-6.1-x86_64", "torch": "2.13.0+cpu",
                        "numpy": "2.4.6", "pandas": "3.1.1", "torch_threads": 2,
                        "deterministic_algorithms": True, "cuda": None},
        "hashes": {"data/prepared/ratings.parquet": "3" * 64, "params.yaml": "5" * 64},
    }


def _gate(params: dict[str, Any], root: Path) -> None:
    # Written through the real implementation so the fixture cannot drift from it.
    from audit.gate import record_gates

    record_gates(root, params)


def data_context(hostile: bool = False) -> dict[str, Any]:
    """The `data` dict the report renders (see audit.report's docstring for its shape)."""
    groups = [{"attribute": a, "group": g, "n_users": n} for a, gs in ATTRIBUTES.items() for g, n in gs.items()]
    top_items = [{"item_id": 50, "title": "Star Wars (1977)", "n_ratings": 583},
                 {"item_id": 258, "title": "Contact (1997)", "n_ratings": 509}]
    if hostile:
        groups.append({"attribute": "occupation", "group": XSS_SCRIPT, "n_users": 12})
        groups.append({"attribute": "occupation", "group": XSS_IMG, "n_users": 9})
        top_items.append({"item_id": 9999, "title": XSS_IMG, "n_ratings": 7})
        top_items.append({"item_id": 9998, "title": XSS_SCRIPT, "n_ratings": 6})
    intersections = [{"attributes": "gender x age", "group": f"{g} x {a}", "n_users": max(1, ng * na // 943)}
                     for g, ng in ATTRIBUTES["gender"].items() for a, na in ATTRIBUTES["age"].items()]
    return {
        "source": "movielens-100k",
        "path": "../shared/datasets/ml-100k",
        "checksum": "9f1c" + "0" * 60,
        "files": [{"name": "u.data", "sha256": "06a5" + "1" * 60}, {"name": "u.user", "sha256": "4f0e" + "2" * 60},
                  {"name": "u.item", "sha256": "553b" + "3" * 60}],
        "counts": {"ratings": 100000, "users": 943, "items": 1682},
        "rating_range": [1.0, 5.0],
        "sensitive": ["gender", "age", "occupation"],
        "groups": groups,
        "intersections": intersections,
        "scenarios": [
            {"scenario": "train", "n_users": 600, "n_items": 1500, "n_ratings": 61000, "n_tasks": 600},
            {"scenario": "warm", "n_users": 600, "n_items": 1300, "n_ratings": 6000, "n_tasks": 600},
            {"scenario": "user_cold", "n_users": 180, "n_items": 1400, "n_ratings": 14500, "n_tasks": 180},
            {"scenario": "item_cold", "n_users": 420, "n_items": 150, "n_ratings": 2100, "n_tasks": 420},
            {"scenario": "user_item_cold", "n_users": 120, "n_items": 140, "n_ratings": 700, "n_tasks": 120},
        ],
        "top_items": top_items,
    }


_CACHE: dict[tuple[Any, ...], Path] = {}


def write_fixture_project(root: Path, *, gates_pass: bool = True, hostile: bool = False,
                          deterministic: bool = True, with_models: bool = True,
                          with_data_files: bool = True) -> Path:
    """Write params.yaml, dvc.lock, metrics/*.json, results/metrics_long.parquet and models/ under root.

    `gates_pass=False` tightens one gate so the verdict is FAILED; `hostile=True` plants script and
    markup strings in group names and item titles (the escaping tests); `with_data_files` also
    writes data/prepared/meta.json and data/tasks/summary.json as the pipeline would.
    Each variant is generated once per test session and copied (generation takes ~0.5 s).
    """
    key = (gates_pass, hostile, deterministic, with_models, with_data_files)
    if key not in _CACHE or not _CACHE[key].is_dir():
        cache_dir = Path(tempfile.mkdtemp(prefix="metarec-fixture-"))
        atexit.register(shutil.rmtree, cache_dir, True)
        _CACHE[key] = _generate(cache_dir, *key)
    shutil.copytree(_CACHE[key], root, dirs_exist_ok=True)
    return Path(root)


def _generate(root: Path, gates_pass: bool, hostile: bool, deterministic: bool, with_models: bool,
              with_data_files: bool) -> Path:
    """The uncached writer behind write_fixture_project."""
    return _write(root, gates_pass=gates_pass, hostile=hostile, deterministic=deterministic,
                  with_models=with_models, with_data_files=with_data_files)


def _write(root: Path, *, gates_pass: bool = True, hostile: bool = False,
                          deterministic: bool = True, with_models: bool = True,
                          with_data_files: bool = True) -> Path:
    root = Path(root)
    rng = random.Random(20240607)
    params = _params(gates_pass)
    atomic_write_text(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    atomic_write_text(root / "dvc.lock", "schema: '2.0'\nstages:\n  prepare:\n    cmd: python -m pipelines.prepare\n"
                                         "    outs:\n    - path: data/prepared\n      md5: 0123456789abcdef0123456789abcdef.dir\n")
    atomic_write_json(root / "metrics" / "summary.json", _summary(rng))
    atomic_write_json(root / "metrics" / "fairness.json", _fairness(rng, hostile))
    atomic_write_json(root / "metrics" / "robustness.json", _robustness(rng, hostile))
    atomic_write_json(root / "metrics" / "reproducibility.json", _reproducibility(rng, deterministic))
    _gate(params, root)
    rows = [{"model": m, "seed": s, "scenario": sc, "perturbation": "none", "attribute": "all", "group": "all",
             "metric": "mae", "value": BASE_MAE[m] + SCENARIO_PENALTY[sc]} for m in MODELS for s in SEEDS for sc in SCENARIOS]
    atomic_write_parquet(root / "results" / "metrics_long.parquet", pd.DataFrame(rows))
    per_user = [{"model": m, "seed": s, "scenario": sc, "user_id": u, "metric": "mae",
                 "value": BASE_MAE[m] + SCENARIO_PENALTY[sc] + rng.gauss(0.0, 0.1)}
                for m in MODELS for s in SEEDS for sc in SCENARIOS for u in range(1, 21)]
    atomic_write_parquet(root / "results" / "per_user.parquet", pd.DataFrame(per_user))
    atomic_write_json(root / "metrics" / "provenance.json", {
        "source": "movielens-100k", "data_canonical_sha256": "d" * 64, "tasks_sha256": "t" * 64,
        "counts": {"ratings": 100000, "users": 943, "items": 1682}})
    if with_models:
        for model in ("melu", "finetune"):
            for seed in SEEDS:
                d = root / "models" / model / f"seed{seed}"
                atomic_write_bytes(d / "weights.safetensors", bytes(rng.randrange(256) for _ in range(256)))
                atomic_write_json(d / "config.json", {"name": model, "seed": seed, "embedding_dim": 32})
                atomic_write_json(d / "history.json", [{"epoch": 1, "train_loss": 1.1, "val_loss": 1.2}])
    if with_data_files:
        _write_data_files(root, data_context(hostile))
    return root


def _write_data_files(root: Path, ctx: dict[str, Any]) -> None:
    """data/prepared/{meta.json, items.parquet, ratings.parquet}, data/tasks/summary.json and the
    strata counts of metrics/summary.json, in the formats the pipeline writes."""
    import json

    meta = {"source": ctx["source"], "counts": ctx["counts"],
            "provenance": {"source": "METAREC_ML100K", "location": ctx["path"], "canonical_sha256": ctx["checksum"],
                           "files": {f["name"]: f["sha256"] for f in ctx["files"]}},
            "spec": {"sensitive": ctx["sensitive"], "rating_min": 1.0, "rating_max": 5.0,
                     "user_attributes": [], "item_features": []}}
    atomic_write_json(root / "data" / "prepared" / "meta.json", meta)
    items = pd.DataFrame({"item_id": [t["item_id"] for t in ctx["top_items"]],
                          "title": [t["title"] for t in ctx["top_items"]]})
    ratings = pd.DataFrame({"item_id": [t["item_id"] for t in ctx["top_items"] for _ in range(t["n_ratings"])]})
    atomic_write_parquet(root / "data" / "prepared" / "items.parquet", items)
    atomic_write_parquet(root / "data" / "prepared" / "ratings.parquet", ratings)
    rows = [{"split": s["scenario"], "attribute": "all", "group": "all", "users": s["n_users"], "items": s["n_items"],
             "tasks": s["n_tasks"], "ratings": s["n_ratings"]} for s in ctx["scenarios"]]
    atomic_write_json(root / "data" / "tasks" / "summary.json", {"config": {}, "rows": rows})
    summary = json.loads((root / "metrics" / "summary.json").read_text())
    summary["strata"] = ([{"attribute": g["attribute"], "group": g["group"], "n": g["n_users"], "merged": False}
                          for g in ctx["groups"]]
                         + [{"attribute": g["attributes"], "group": g["group"], "n": g["n_users"], "merged": False}
                            for g in ctx["intersections"]])
    atomic_write_json(root / "metrics" / "summary.json", summary)
