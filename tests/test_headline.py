"""metrics/headline.json: the only DVC metric, a few dozen scalars with known values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from audit.headline import HeadlineError, headline

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, name: str, doc: dict) -> None:
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / f"{name}.json").write_text(json.dumps(doc))


def _acc(model: str, scenario: str, metric: str, mean: float) -> dict:
    return {"kind": "accuracy", "model": model, "scenario": scenario, "metric": metric, "mean": mean}


def _gap(scenario: str, attribute: str, diff: float | None, p_adj: float | None, insufficient: bool = False) -> dict:
    return {"kind": "gap", "model": "melu", "scenario": scenario, "attribute": attribute, "metric": "mae",
            "difference": diff, "p_adjusted": p_adj, "insufficient": insufficient}


def test_headline_picks_the_audited_models_and_the_largest_sufficient_gap(tmp_path: Path) -> None:
    _write(tmp_path, "summary", {"records": [
        _acc("melu", "warm", "mae", 0.81), _acc("melu", "warm", "list_ndcg@10", 0.12),
        _acc("melu", "warm", "ndcg@5", 0.9), _acc("svd", "warm", "mae", 0.79), _acc("pop", "warm", "mae", 0.95)]})
    _write(tmp_path, "fairness", {"records": [
        _gap("warm", "gender", 0.02, 0.5), _gap("user_cold", "gender", 0.05, 0.03),
        _gap("user_cold", "age", 0.40, None, insufficient=True), _gap("warm", "age", 0.01, 0.9),
        {**_gap("warm", "gender", 0.9, 0.001), "metric": "rmse"}]})
    _write(tmp_path, "gate", {"passed": False, "records": [
        {"kind": "gate", "name": "a", "outcome": "pass"}, {"kind": "gate", "name": "b", "outcome": "inconclusive"},
        {"kind": "gate", "name": "c", "passed": False}]})
    doc = headline(tmp_path, ["svd"], "melu", "list_ndcg@10")
    assert doc == {
        "verdict": "FAILED", "gates": {"pass": 1, "fail": 1, "inconclusive": 1},
        "accuracy": {"melu": {"warm": {"mae": 0.81, "list_ndcg@10": 0.12}}, "svd": {"warm": {"mae": 0.79}}},
        "fairness": {"melu": {"age": {"largest_mae_gap": 0.01, "scenario": "warm", "p_adjusted": 0.9},
                              "gender": {"largest_mae_gap": 0.05, "scenario": "user_cold", "p_adjusted": 0.03}}},
    }


def test_missing_input_is_one_sentence(tmp_path: Path) -> None:
    _write(tmp_path, "summary", {"records": []})
    with pytest.raises(HeadlineError, match=r"cannot write the headline: .*fairness.json is missing"):
        headline(tmp_path, [], "melu", "list_ndcg@10")


def test_only_the_headline_is_a_dvc_metric() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(m)) if isinstance(m, dict) else m for st in stages.values() for m in st.get("metrics", [])]
    assert declared == ["metrics/headline.json"]
