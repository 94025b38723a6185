"""Gates with three outcomes: an interval wholly on the right side passes, wholly on the wrong side
fails, straddling the threshold is inconclusive; `on_inconclusive` decides the exit code; records
marked insufficient or lacking a bound never pass silently. Messages are tested exactly."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from audit.cli import main
from audit.gate import GateInputError, evaluate_gates, format_table, record_gates

GAP = {"kind": "gap", "model": "melu", "scenario": "user_cold", "attribute": "gender", "metric": "mae"}


def _project(root: Path, records: list[dict[str, Any]], gates: list[dict[str, Any]]) -> Path:
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "fairness.json").write_text(json.dumps({"records": records}))
    (root / "params.yaml").write_text(yaml.safe_dump({"gates": gates}, sort_keys=False))
    return root


def _gap(**fields: Any) -> dict[str, Any]:
    return {**GAP, "difference": 0.05, "diff_ci_low": 0.01, "diff_ci_high": 0.09, "p_value": 0.02,
            "p_adjusted": 0.04, "p_adjusted_mc_low": 0.035, "p_adjusted_mc_high": 0.045, "insufficient": False,
            **fields}


def _gate(**fields: Any) -> dict[str, Any]:
    return {"name": "g", "file": "fairness", "where": dict(GAP), "field": "difference", "op": "<=",
            "threshold": 0.1, **fields}


def _one(tmp_path: Path, record: dict[str, Any], gate: dict[str, Any]):
    root = _project(tmp_path, [record], [gate])
    (res,) = evaluate_gates(root, yaml.safe_load((root / "params.yaml").read_text()))
    return res


@pytest.mark.parametrize("op, threshold, outcome, message", [
    ("<=", 0.1, "pass", "difference interval [0.01, 0.09] lies wholly <= 0.1"),
    ("<=", 0.005, "fail", "difference interval [0.01, 0.09] lies wholly outside <= 0.005"),
    ("<=", 0.05, "inconclusive", "difference interval [0.01, 0.09] straddles the threshold 0.05: "
                                 "neither <= 0.05 nor its opposite is established"),
    (">", 0.0, "pass", "difference interval [0.01, 0.09] lies wholly > 0"),
    (">", 0.09, "fail", "difference interval [0.01, 0.09] lies wholly outside > 0.09"),
    ("<", 0.09, "inconclusive", "difference interval [0.01, 0.09] straddles the threshold 0.09: "
                                "neither < 0.09 nor its opposite is established"),
])
def test_interval_against_threshold(tmp_path: Path, op: str, threshold: float, outcome: str, message: str) -> None:
    res = _one(tmp_path, _gap(), _gate(op=op, threshold=threshold))
    assert (res.outcome, res.message) == (outcome, message)
    assert res.passed is (outcome == "pass")
    assert res.interval == "diff_ci_low, diff_ci_high" and (res.interval_low, res.interval_high) == (0.01, 0.09)
    assert res.observed == 0.05  # the point estimate is reported, but the interval decides


def test_point_estimate_alone_would_have_passed_but_interval_is_inconclusive(tmp_path: Path) -> None:
    # The example: a ratio of 0.438 with interval [0.0, 0.495] against >= 0.2.
    rec = {**GAP, "metric": "ndcg@10", "ratio": 0.438, "ratio_ci_low": 0.0, "ratio_ci_high": 0.495}
    res = _one(tmp_path, rec, _gate(where={**GAP, "metric": "ndcg@10"}, field="ratio", op=">=", threshold=0.2))
    assert res.outcome == "inconclusive" and res.interval == "ratio_ci_low, ratio_ci_high" and not res.passed
    res = _one(tmp_path, rec, _gate(where={**GAP, "metric": "ndcg@10"}, field="ratio", op=">=", threshold=0.2,
                                    interval=None))
    assert res.outcome == "pass" and res.interval == "" and res.message == "ratio = 0.438 >= 0.2 holds"


def test_adjusted_p_value_uses_its_monte_carlo_interval(tmp_path: Path) -> None:
    gate = _gate(field="p_adjusted", op=">=", threshold=0.04)
    res = _one(tmp_path, _gap(), gate)
    assert res.interval == "p_adjusted_mc_low, p_adjusted_mc_high" and res.outcome == "inconclusive"
    assert _one(tmp_path, _gap(), {**gate, "threshold": 0.01}).outcome == "pass"
    assert _one(tmp_path, _gap(), {**gate, "threshold": 0.05}).outcome == "fail"


def test_explicit_interval_and_accuracy_mean_defaults_to_seeds_and_users(tmp_path: Path) -> None:
    res = _one(tmp_path, _gap(lo=0.0, hi=0.2), _gate(interval=["lo", "hi"]))
    assert res.interval == "lo, hi" and res.outcome == "inconclusive"
    acc = {"kind": "accuracy", "model": "melu", "scenario": "user_cold", "metric": "mae", "mean": 0.8,
           "ci_low": 0.79, "ci_high": 0.81, "ci_users_low": 0.76, "ci_users_high": 0.84}
    res = _one(tmp_path, acc, _gate(where={"kind": "accuracy", "model": "melu"}, field="mean", op="<=", threshold=0.82))
    assert res.interval == "ci_users_low, ci_users_high" and res.outcome == "inconclusive"


def test_insufficient_record_is_inconclusive_never_a_silent_pass(tmp_path: Path) -> None:
    res = _one(tmp_path, _gap(insufficient=True, n=3), _gate())
    assert res.outcome == "inconclusive" and not res.passed
    assert res.message == ("the selected record is marked insufficient (n = 3): its groups are below the minimum "
                           "size, so the gate cannot pass on it")
    res = _one(tmp_path, _gap(insufficient=True, n=3), _gate(on_inconclusive="pass"))
    assert res.outcome == "inconclusive" and res.passed


def test_missing_bound_is_inconclusive(tmp_path: Path) -> None:
    res = _one(tmp_path, _gap(diff_ci_high=None), _gate())
    assert res.outcome == "inconclusive" and res.message == (
        "the interval [diff_ci_low, diff_ci_high] of difference is missing (null or NaN), so the gate cannot pass")


def test_on_inconclusive_decides_the_exit_code_and_every_output_shows_the_third_state(tmp_path: Path, capsys) -> None:
    gates = [_gate(name="decided", threshold=0.1), _gate(name="open", threshold=0.05)]
    root = _project(tmp_path, [_gap()], gates)
    assert main(["--root", str(root), "gate"]) == 1
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("open"))
    assert row.endswith("[0.01, 0.09]  INCONCLUSIVE (counts as fail)")
    assert "1 of 2 gates pass; 1 inconclusive (1 counted as failing)" in out
    assert err == ("gate open is inconclusive (on_inconclusive: fail): difference interval [0.01, 0.09] straddles "
                   "the threshold 0.05: neither <= 0.05 nor its opposite is established\n")
    case = ET.parse(root / "reports" / "gate.junit.xml").getroot().find(".//testcase[@name='open']")
    assert case.find("failure").get("type") == "GateInconclusive"
    md = (root / "reports" / "gate.md").read_text()
    assert "| open | 0.05 | &lt;= | 0.05 | [0.01, 0.09] | **INCONCLUSIVE (counts as fail)** |" in md

    gates[1]["on_inconclusive"] = "pass"
    _project(tmp_path, [_gap()], gates)
    assert main(["--root", str(root), "gate"]) == 0
    out, _ = capsys.readouterr()
    assert "1 of 2 gates pass; 1 inconclusive (0 counted as failing)" in out
    suite = ET.parse(root / "reports" / "gate.junit.xml").getroot().find("testsuite")
    assert suite.get("skipped") == "1" and suite.get("failures") == "0"
    assert suite.find("testcase[@name='open']/skipped") is not None
    doc = record_gates(root, yaml.safe_load((root / "params.yaml").read_text()))
    rec = {r["name"]: r for r in doc["records"]}
    assert doc["passed"] is True and rec["open"]["outcome"] == "inconclusive" and rec["open"]["passed"] is True
    assert {k: rec["decided"][k] for k in ("threshold", "observed", "interval_low", "interval_high", "outcome")} == \
        {"threshold": 0.1, "observed": 0.05, "interval_low": 0.01, "interval_high": 0.09, "outcome": "pass"}
    assert main(["--root", str(root), "summary"]) == 0
    out, _ = capsys.readouterr()
    assert "gates: PASSED (1 of 2 pass, 1 inconclusive)" in out and "INCONCLUSIVE (counts as pass) open:" in out


@pytest.mark.parametrize("edit, message", [
    ({"on_inconclusive": "maybe"}, "gate 'g': on_inconclusive must be 'fail' or 'pass', got 'maybe'"),
    ({"interval": "diff_ci_low"}, "gate 'g': 'interval' must be a list of two field names [low, high] or null, "
                                  "got 'diff_ci_low'"),
    ({"op": "==", "interval": ["diff_ci_low", "diff_ci_high"]},
     "gate 'g': op '==' cannot be checked against an interval; use <, <=, > or >=, or remove 'interval'"),
    ({"interval": ["lo", "diff_ci_high"]}, "gate 'g': the matching record has no interval field(s) ['lo']"),
])
def test_malformed_interval_settings_are_input_errors(tmp_path: Path, edit: dict, message: str) -> None:
    root = _project(tmp_path, [_gap()], [_gate(**edit)])
    with pytest.raises(GateInputError) as exc:
        evaluate_gates(root, yaml.safe_load((root / "params.yaml").read_text()))
    assert str(exc.value) == message


def test_default_gates_never_read_a_bare_point_estimate() -> None:
    """params.yaml's gates read a boolean, a field with an interval, or an adjusted p-value with its
    Monte-Carlo interval; the one exception allowed is a gate that names why in its description."""
    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    for g in params["gates"]:
        if isinstance(g["threshold"], bool) or "interval" in g:
            continue
        assert g["field"] in ("mean", "mean_diff", "difference", "p_adjusted"), g["name"]


def test_table_lists_interval_column(tmp_path: Path) -> None:
    root = _project(tmp_path, [_gap()], [_gate()])
    table = format_table(evaluate_gates(root, yaml.safe_load((root / "params.yaml").read_text())))
    assert table.splitlines()[0].split() == ["gate", "observed", "op", "threshold", "interval", "result"]


def test_report_shows_the_third_state_and_quotes_the_seeds_and_users_interval(tmp_path: Path) -> None:
    from audit.report import build_context, render_report
    from tests.fixtures_metrics import write_fixture_project

    root = write_fixture_project(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    fair = json.loads((root / "metrics" / "fairness.json").read_text())
    gap = next(r for r in fair["records"] if all(r.get(k) == v for k, v in params["gates"][1]["where"].items()))
    params["gates"][1].update(field="difference", threshold=(gap["diff_ci_low"] + gap["diff_ci_high"]) / 2)
    summary_path = root / "metrics" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for r in summary["records"]:
        if r["kind"] == "accuracy":
            r.update(ci_users_low=r["mean"] - 0.0333, ci_users_high=r["mean"] + 0.0333)
    summary_path.write_text(json.dumps(summary))
    doc = record_gates(root, params)
    assert [r["outcome"] for r in doc["records"]] == ["pass", "inconclusive", "pass", "pass"]
    ctx = build_context(root, params)
    html = render_report(ctx)
    assert "INCONCLUSIVE" in html and "counts as fail" in html and "straddles the threshold" in html
    assert "3 of 4 release gates pass; 1 inconclusive." in html
    assert "inconclusive (the interval straddles the threshold, or the record is insufficient): gender_mae_gap_upper" \
        in ctx["verdict"]["findings"][0]
    melu = next(r for r in summary["records"] if r["kind"] == "accuracy" and r["model"] == "melu"
                and r["scenario"] == "user_cold" and r["metric"] == "mae")
    line = next(q for q in ctx["model_card"]["quantitative"] if q.startswith("user_cold"))
    assert line == (f"user_cold: mae {melu['mean']:.4g} (95% interval over seeds and users "
                    f"{melu['ci_users_low']:.4g} to {melu['ci_users_high']:.4g}; over the 3 training seeds alone, "
                    f"{melu['ci_low']:.4g} to {melu['ci_high']:.4g})")
    assert f"[{melu['ci_users_low']:.4g}, {melu['ci_users_high']:.4g}]" in html
