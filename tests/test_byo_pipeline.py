"""The whole trimmed pipeline (`dvc repro`) on a second dataset shape: string ids, country, plan,
ages at custom edges, no release year (tests/byo_dataset.py). The audit must complete, skip the
item-cold scenarios with their reason said once, carry the original ids in its outputs and show
the declared groups in the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import byo_dataset

REPO = Path(__file__).resolve().parents[1]
COPIED = ("metarec", "audit", "pipelines", "reports/templates", "dvc.yaml", "params.yaml", "pyproject.toml")


def trimmed_params(data: dict) -> dict:
    """The repository's params with the cheapest models and small statistics budgets."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(data=data, seeds=[0], models=["mean", "bias"], meta_learner="bias",
                  model_params={"mean": {}, "bias": {}})
    params["strata"].update(attributes=["country", "age", "plan", "activity"], intersections=[["country", "plan"]])
    params["evaluation"].update(bootstrap=200, permutations=200)
    params["fairness"].update(models=["bias", "mean"], counterfactual_models=[], counterfactual_scenarios=["user_cold"])
    rob = params["robustness"]
    rob.update(seed=0, models=["bias"], scenarios=["user_cold"], support_size=[1, 5], rating_noise=[0.2])
    rob["attribute_noise"] = {"attribute": "plan", "levels": [0.3]}
    rob["demographic_shift"] = {"attribute": "plan", "mix": {"free": 0.5, "pro": 0.5}}
    rob["shilling"].update(models=["mean"], strategies=["random"], fractions=[0.05], n_targets=2, filler_size=5)
    params["determinism"] = {"model": "bias", "seed": 0}
    params["feedback"].update(models=["bias"], seeds=[0], rounds=1, policies=["greedy", "random", "oracle"])
    params["gates"] = [
        {"name": "determinism_holds", "file": "reproducibility", "where": {"kind": "determinism"},
         "field": "identical", "op": "==", "threshold": True},
        {"name": "plan_mae_gap", "file": "fairness",
         "where": {"kind": "gap", "model": "bias", "scenario": "user_cold", "attribute": "plan", "metric": "mae"},
         "field": "p_value", "op": ">=", "threshold": 0.0},
    ]
    return params


def copy_repo(dst: Path) -> None:
    for rel in COPIED:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.mark.slow
def test_byo_dataset_runs_the_whole_audit(tmp_path: Path) -> None:
    copy_repo(tmp_path)
    data = byo_dataset.write(tmp_path / "byo")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(trimmed_params(data), sort_keys=False))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run("dvc", "init", "--no-scm", "-q").returncode == 0
    repro = run("dvc", "repro")
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    out = repro.stdout + repro.stderr
    reason = "the items have no release_year, so no item is new and there are no item-cold scenarios"
    assert f"item_cold, user_item_cold: empty, {reason}" in out  # one line for both scenarios
    assert "item_cold: empty" not in out.replace("user_item_cold: empty", "")

    summary = json.loads((tmp_path / "data/tasks/summary.json").read_text())
    assert summary["empty"] == {"item_cold": reason, "user_item_cold": reason}
    pred = pd.read_parquet(tmp_path / "predictions/bias/seed0.parquet")
    assert set(pred.scenario) == {"warm", "user_cold"}
    ratings, users, items = byo_dataset.tables()
    assert set(pred.original_user_id) <= set(users.user_id) and set(pred.original_item_id) <= set(items.item_id)
    truth = ratings.set_index(["user_id", "item_id"])["rating"]
    got = pred.set_index(["original_user_id", "original_item_id"])["y_true"]
    assert (truth.loc[got.index].to_numpy() == got.to_numpy()).all()  # the ids name the right ratings
    per_user = pd.read_parquet(tmp_path / "results/per_user.parquet")
    assert set(per_user.original_user_id) <= set(users.user_id)

    html = (tmp_path / "reports/audit.html").read_text()
    for attribute in ("country", "plan"):
        assert attribute in html
    for group in (*byo_dataset.PLANS, "DE", "US"):
        assert f">{group}<" in html or f"{group}" in html
    # The declared age buckets (edges 30, 45). Needs the schema-driven strata (issue 15 item 1).
    for group in byo_dataset.AGE_GROUPS:
        assert group.replace("<", "&lt;").replace(">", "&gt;") in html or group in html, group


def readme_data_block() -> dict:
    """The `data:` block of README.md's bring-your-own example, as written there."""
    text = (REPO / "README.md").read_text()
    start = text.index("```yaml\ndata:\n  source: csv")
    return yaml.safe_load(text[start + len("```yaml\n"): text.index("```", start + 7)])["data"]


def test_readme_byo_example_passes_prepare_and_tasks(tmp_path: Path) -> None:
    """README's example, verbatim, on tables of its own shape: the one validation pass accepts it and
    every scenario gets tasks. (The full `make audit` on it also needs the schema-driven strata.)"""
    from audit.config import load_checked
    from metarec.splits import SplitConfig, build_splits

    byo_dataset.write_readme_shape(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = readme_data_block()
    lines: list[str] = []
    cfg, data = load_checked(params, tmp_path, log=lines.append)
    assert data.ids["user_id"].kind == "integer" and len(data.ratings) > 4000
    splits = build_splits(data, SplitConfig(**cfg.tasks.model_dump()))
    assert all(len(splits[s]) for s in ("train", "val", "warm", "user_cold", "item_cold", "user_item_cold"))
    assert not any("empty" in line for line in lines)
