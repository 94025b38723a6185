"""The HTML report: required sections, self-containedness, determinism, numbers from the metrics, escaping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from audit.cli import main
from audit.report import ReportError, build_context, render_report
from audit.signing import KEY_ENV, key_id, keygen, load_public_key
from tests.fixtures_metrics import XSS_IMG, XSS_SCRIPT, data_context, write_fixture_project

from tests.test_browser import SECTIONS


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _render(root: Path, **kw) -> str:
    return render_report(build_context(root, _params(root), **kw))


def test_sections_in_order_and_self_contained(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    html = _render(root)
    assert re.findall(r"<h2>(.*?)</h2>", html) == SECTIONS
    lowered = html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "<img" not in lowered
    assert "@import" not in lowered and "url(" not in lowered and "<iframe" not in lowered
    # the only absolute URL is the SVG namespace, which is an identifier and never fetched
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert not re.search(r"\s(src|srcset|action|formaction)=", lowered)
    assert "@media print" in html
    assert html.count("<svg") >= 8  # accuracy forests, gap forest, degradation curves, verdict bar


def test_render_is_deterministic(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    assert _render(root) == _render(root)


def test_numbers_come_from_the_metrics(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path, gates_pass=False)
    html = _render(root)
    summary = json.loads((root / "metrics" / "summary.json").read_text())
    melu = next(r for r in summary["records"] if r["kind"] == "accuracy" and r["model"] == "melu"
                and r["scenario"] == "user_cold" and r["metric"] == "mae")
    assert f"{melu['mean']:.4g}" in html and f"[{melu['ci_low']:.4g}, {melu['ci_high']:.4g}]" in html
    assert "FAILED" in html and "3 of 4 release gates pass" in html and "gender_mae_gap_upper" in html
    gate = json.loads((root / "metrics" / "gate.json").read_text())
    compared = next(r for r in gate["records"] if r["interval"])
    assert f"{compared['interval_low']:.4g} to {compared['interval_high']:.4g}" in html  # the interval compared
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"):
        assert f"<h3>{section}</h3>" in html
    assert "Holm" in html and "p (Holm)" in html


def test_signature_section_states_key_and_subjects_before_signing(tmp_path: Path, capsys) -> None:
    root = write_fixture_project(tmp_path)
    assert main(["--root", str(root), "report"]) == 0
    html = (root / "reports" / "audit.html").read_text()
    dev_pub = load_public_key(root / "keys" / "dev-signing.pub")
    kid = key_id(dev_pub)
    assert f'name="metarec-signer-keyid" content="{kid}"' in html
    assert "development key" in html
    assert main(["--root", str(root), "sign"]) == 0
    bundle = json.loads((root / "reports" / "audit.bundle.json").read_text())
    import base64

    names = [s["name"] for s in json.loads(base64.b64decode(bundle["payload"]))["subject"]]
    listed = re.findall(r'<li><code>([^<]+)</code></li>', html.split("<h2>Signature</h2>")[1])
    assert listed == names
    assert "metarec-audit verify reports/audit.bundle.json --key reports/signing.pub" in html
    assert "openssl pkeyutl -verify -pubin" in html


def test_release_key_is_not_called_development(tmp_path: Path, monkeypatch) -> None:
    root = write_fixture_project(tmp_path / "p")
    key, _ = keygen(tmp_path / "k")
    monkeypatch.setenv(KEY_ENV, str(key))
    html = _render(root)
    assert "Development key." not in html and "$METAREC_AUDIT_SIGNING_KEY_FILE" in html
    assert not (root / "keys").exists()


def _assert_only_escaped(html: str) -> None:
    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    assert XSS_SCRIPT not in html and XSS_IMG not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html


def test_hostile_strings_are_escaped_everywhere_including_svg(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path, hostile=True)
    html = _render(root, data=data_context(hostile=True))
    _assert_only_escaped(html)
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in s for s in svgs), "hostile group should reach a chart"
    data_part = html.split("<h2>Data</h2>")[1].split("<h2>")[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in data_part  # group name and item title in Data
    assert data_part.count("&#34;&gt;&lt;img src=x onerror=alert(1)&gt;") >= 2


def test_hostile_params_are_escaped(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    params = _params(root)
    params["gates"][0]["description"] = XSS_SCRIPT
    params["melu"]["note"] = XSS_IMG
    params["data"]["source"] = XSS_IMG
    from audit.gate import record_gates

    record_gates(root, params)
    _assert_only_escaped(render_report(build_context(root, params)))


def test_data_context_from_pipeline_files(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    ctx = build_context(root, _params(root))
    expected = data_context()
    d = ctx["data"]
    assert d["available"] and d["source"] == "movielens-100k" and d["counts"] == expected["counts"]
    assert {(g["attribute"], g["group"], g["n_users"]) for g in d["groups"]} == \
        {(g["attribute"], g["group"], g["n_users"]) for g in expected["groups"]}
    assert len(d["intersections"]) == len(expected["intersections"])
    assert [s["scenario"] for s in d["scenarios"]] == [s["scenario"] for s in expected["scenarios"]]
    json.dumps(ctx)  # plain data: the lead can dump it for debugging


def test_missing_data_files_refuse_to_render(tmp_path: Path, capsys) -> None:
    root = write_fixture_project(tmp_path, with_data_files=False, with_models=False)
    rc = main(["--root", str(root), "report"])
    assert rc == 2
    assert "data/prepared/meta.json is missing (run the prepare and tasks stages)" in capsys.readouterr().err
    assert not (root / "reports" / "audit.html").exists()


def test_strict_undefined_and_missing_metrics(tmp_path: Path, capsys) -> None:
    root = write_fixture_project(tmp_path)
    ctx = build_context(root, _params(root))
    del ctx["reproducibility"]
    with pytest.raises(ReportError):
        render_report(ctx)
    (root / "metrics" / "summary.json").unlink()
    rc = main(["--root", str(root), "report"])
    assert rc == 2 and "metrics/summary.json is missing" in capsys.readouterr().err


def test_hostile_titles_and_groups_from_pipeline_files_are_escaped(tmp_path: Path) -> None:
    # The titles come from data/prepared/items.parquet and the group names from the strata
    # counts, exactly as the pipeline writes them; nothing is passed in by hand.
    root = write_fixture_project(tmp_path, hostile=True)
    html = render_report(build_context(root, _params(root)))
    _assert_only_escaped(html)
