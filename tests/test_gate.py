"""`metarec-audit gate`: exit codes 0/1/2, the JUnit and Markdown outputs, and the DVC-stage writer."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from audit.cli import main
from audit.gate import record_gates
from tests.fixtures_metrics import write_fixture_project


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _edit_params(root: Path, edit) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_all_gates_pass_exit_0_and_reports(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path)
    rc, out, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 0, err
    assert "4 of 4 gates pass" in out and "PASS" in out and "FAIL" not in out
    suite = ET.parse(tmp_path / "reports" / "gate.junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["melu_not_worse_than_mean_user_cold", "gender_mae_gap_upper",
                                              "melu_deterministic_seed0", "rating_noise_damage"]
    assert suite.get("failures") == "0" and not suite.findall("testcase/failure")
    md = (tmp_path / "reports" / "gate.md").read_text()
    assert md.startswith("## metarec-audit gates: PASSED")
    assert md.count("| PASS |") == 4


def test_failing_gate_exit_1_with_junit_failure(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path, gates_pass=False)
    rc, out, err = _run(capsys, "gate", "--root", str(tmp_path))
    assert rc == 1
    assert "gender_mae_gap_upper" in err and "Traceback" not in err
    row = next(line for line in out.splitlines() if line.startswith("gender_mae_gap_upper"))
    assert row.rstrip().endswith("FAIL") and "<=" in row and "0.01" in row
    root = ET.parse(tmp_path / "reports" / "gate.junit.xml").getroot()
    failures = root.findall(".//testcase/failure")
    assert len(failures) == 1
    assert "diff_ci_high" in failures[0].get("message") and "violated" in failures[0].get("message")
    md = (tmp_path / "reports" / "gate.md").read_text()
    assert "FAILED" in md and "**FAIL**" in md and "`gender_mae_gap_upper`" in md


def test_record_gates_never_raises_on_failure_and_record_only_exits_0(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path, gates_pass=False)
    doc = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    assert doc["passed"] is False
    rec = {r["name"]: r for r in doc["records"]}
    assert rec["gender_mae_gap_upper"]["passed"] is False and rec["gender_mae_gap_upper"]["kind"] == "gate"
    # the gate reads an upper bound itself, so it is a point comparison with no interval of its own
    assert rec["gender_mae_gap_upper"]["outcome"] == "fail" and rec["gender_mae_gap_upper"]["interval"] == ""
    assert rec["melu_not_worse_than_mean_user_cold"]["interval"] == "ci_low, ci_high"
    assert rec["melu_not_worse_than_mean_user_cold"]["interval_high"] is not None
    assert all(not isinstance(v, (dict, list)) for r in doc["records"] for v in r.values())  # flat records
    rc, out, _ = _run(capsys, "--root", str(tmp_path), "gate", "--record-only")
    assert rc == 0 and "FAILED" in out


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["gates"][0].update(file="nosuchfile"), ["melu_not_worse_than_mean_user_cold", "'nosuchfile'"]),
    (lambda p: p["gates"][1]["where"].update(model="nosuchmodel"), ["gender_mae_gap_upper", "no record", "nosuchmodel"]),
    (lambda p: p["gates"][1].update(field="nosuchfield"), ["gender_mae_gap_upper", "nosuchfield"]),
    (lambda p: p["gates"][1]["where"].pop("attribute"), ["gender_mae_gap_upper", "records", "match"]),
    (lambda p: p["gates"][2].update(op="~="), ["melu_deterministic_seed0", "op"]),
    (lambda p: p.pop("gates"), ["gates"]),
])
def test_input_errors_exit_2_naming_the_gate(tmp_path: Path, capsys, edit, expected) -> None:
    write_fixture_project(tmp_path)
    _edit_params(tmp_path, edit)
    rc, _, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 2
    assert "Traceback" not in err and err.count("\n") == 1
    for word in expected:
        assert word in err


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["gates"][0].update(file="../../outside"),
     "gate 'melu_not_worse_than_mean_user_cold': file '../../outside' is not one of the audit's metrics files "
     "(summary, fairness, robustness, reproducibility, regression, feedback)"),
    (lambda p: p.update(gates=[]),
     "params.yaml 'gates' is empty: a release gate needs at least one named threshold"),
])
def test_gate_boundaries_exit_2_with_the_exact_reason(tmp_path: Path, capsys, edit, message) -> None:
    """Gates read only the audit's own metrics files, and an empty gate list is not a pass."""
    write_fixture_project(tmp_path)
    (tmp_path.parent / "outside.json").write_text('{"records": [{"kind": "x", "v": 1}]}')
    _edit_params(tmp_path, edit)
    rc, out, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 2 and err.strip() == f"metarec-audit gate: {message}"
    assert "0 of 0" not in out


def test_deeply_nested_metrics_file_is_an_input_error(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path)
    (tmp_path / "metrics" / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    rc, _, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 2 and "metrics/summary.json is nested too deeply to be audit output" in err


def test_input_error_is_recorded_not_raised_by_dvc_writer(tmp_path: Path) -> None:
    write_fixture_project(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["gates"][1]["where"]["model"] = "nosuchmodel"
    doc = record_gates(tmp_path, params)
    bad = next(r for r in doc["records"] if r["name"] == "gender_mae_gap_upper")
    assert doc["passed"] is False and bad["passed"] is False and "no record" in bad["error"]


def test_missing_metrics_dir_exit_2(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path)
    (tmp_path / "metrics" / "fairness.json").unlink()
    rc, _, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 2 and "metrics/fairness.json does not exist" in err


def test_null_observed_value_fails_with_message(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path)
    path = tmp_path / "metrics" / "robustness.json"
    doc = json.loads(path.read_text())
    for r in doc["records"]:
        if r["kind"] == "most_damaging" and r["model"] == "melu" and r["perturbation"] == "rating_noise" \
                and r["scenario"] == "user_cold" and r["metric"] == "mae":
            r["delta"] = None
    path.write_text(json.dumps(doc))
    rc, _, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 1
    assert "rating_noise_damage" in err and "null or NaN" in err
    assert "null or NaN" in (tmp_path / "reports" / "gate.junit.xml").read_text()


def test_markdown_escapes_cell_breakers(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path)
    _edit_params(tmp_path, lambda p: p["gates"][0].update(name="a|b<i>"))
    assert _run(capsys, "--root", str(tmp_path), "gate")[0] == 0
    md = (tmp_path / "reports" / "gate.md").read_text()
    assert "a\\|b&lt;i&gt;" in md and "<i>" not in md


def test_bad_params_yaml_is_one_sentence(tmp_path: Path, capsys) -> None:
    (tmp_path / "params.yaml").write_text("gates: [unclosed\n")
    rc, _, err = _run(capsys, "--root", str(tmp_path), "gate")
    assert rc == 2 and "not valid YAML" in err and "Traceback" not in err
    rc, _, err = _run(capsys, "--root", str(tmp_path / "nowhere"), "gate")
    assert rc == 2 and "cannot read params file" in err


@pytest.mark.parametrize("command", ["data", "gate", "keygen", "sign", "verify", "report", "summary"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: metarec-audit " + command in capsys.readouterr().out


def test_summary_prints_path_and_verdict(tmp_path: Path, capsys) -> None:
    write_fixture_project(tmp_path, gates_pass=False)
    rc, out, _ = _run(capsys, "--root", str(tmp_path), "summary")
    assert rc == 0
    assert "reports/audit.html" in out and "FAILED (3 of 4 pass)" in out and "gender_mae_gap_upper" in out
    rc, out, _ = _run(capsys, "--root", str(tmp_path / "empty"), "summary")
    assert rc == 0 and "unknown" in out
