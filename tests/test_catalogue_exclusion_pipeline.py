"""Users who rated nearly every item: the train stage completes, leaves them out of the top-k
lists, and metrics/summary.json and the report count them per scenario (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_byo_pipeline import copy_repo, trimmed_params

K = 10
# a small catalogue and heavy users: a few users of every scenario rate all but <= 10 items of their partition
SYNTHETIC = {"source": "synthetic", "synthetic": {"seed": 0, "n_users": 150, "n_items": 80, "n_ratings": 6000,
                                                 "effects": []}}


def _expected(root: Path) -> dict[str, int]:
    """Users with <= K candidates per scenario, counted from the task files and the item release
    years alone: candidates = items of the scenario's partition - the task's support items."""
    from metarec.data.synthetic import generate

    items = generate(SYNTHETIC["synthetic"])[0].items
    n_new = int((items["release_year"] >= 1997).sum())
    out = {}
    for scenario in ("warm", "user_cold", "item_cold", "user_item_cold"):
        f = pd.read_parquet(root / f"data/tasks/{scenario}.parquet")
        support = f[f.role == "support"].groupby("user_id").size()
        pool = n_new if scenario in ("item_cold", "user_item_cold") else len(items) - n_new
        out[scenario] = int(((pool - support) <= K).sum())
    return out


@pytest.mark.slow
def test_users_with_too_few_candidates_are_counted_not_a_crash(tmp_path: Path) -> None:
    copy_repo(tmp_path)
    params = trimmed_params(SYNTHETIC)
    params["strata"].update(attributes=["gender", "age", "activity"], intersections=[])
    params["fairness"]["counterfactual_scenarios"] = []
    rob = params["robustness"]
    rob["attribute_noise"] = {"attribute": "gender", "levels": [0.3]}
    rob["demographic_shift"] = {"attribute": "gender", "mix": {"F": 0.5, "M": 0.5}}
    params["evaluation"]["catalogue_k"] = K
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (["prepare"], ["tasks"], ["train", "--model", "mean", "--seed", "0"],
                 ["train", "--model", "bias", "--seed", "0"], ["evaluate"], ["report"]):
        run = subprocess.run([sys.executable, "-m", f"pipelines.{args[0]}", *args[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (args, run.stdout[-2000:], run.stderr[-3000:])
    expected = _expected(tmp_path)
    assert all(n > 0 for n in expected.values()), expected  # the data does what this test is about
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    got = {r["scenario"]: r["n_users"] for r in summary["excluded"]}
    assert got == expected
    assert all(r["kind"] == "excluded" and r["k"] == K and "trivially perfect" in r["reason"]
               for r in summary["excluded"])
    for model in ("mean", "bias"):
        ranks = pd.read_parquet(tmp_path / f"rankings/{model}/seed0.parquet")
        pred = pd.read_parquet(tmp_path / f"predictions/{model}/seed0.parquet")
        assert (ranks["n_candidates"] > K).all()
        for scenario, n in expected.items():
            # everyone keeps query predictions; the left-out users have no list
            listed = ranks.loc[ranks.scenario == scenario, "user_id"].nunique()
            assert listed == pred.loc[pred.scenario == scenario, "user_id"].nunique() - n
    html = (tmp_path / "reports/audit.html").read_text()
    of = {r["scenario"]: r["of_users"] for r in summary["excluded"]}
    assert f"{expected['user_cold']} of {of['user_cold']} users are left out of the catalogue metrics" in html
