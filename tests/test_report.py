"""The HTML report: required sections, self-containedness, determinism, numbers from the metrics, escaping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from markupsafe import escape

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


# ----------------------------------------------------------------------------- a report for a reviewer
def _section(html: str, heading: str) -> str:
    return html.split(f"<h2>{heading}</h2>")[1].split("<h2>")[0]


def _write(root: Path, name: str, doc: dict) -> None:
    (root / "metrics" / f"{name}.json").write_text(json.dumps(doc))


def _compact(html: str, scenario: str) -> str:
    part = html.split(f'<h3 id="accuracy-{scenario}">')[1]
    return part.split('<table class="compact">')[1].split("</table>")[0]


def test_compact_accuracy_tables_omit_constant_metrics_and_say_so_once(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    html = _render(root)
    acc = _section(html, "Accuracy against baselines")
    item_cold, warm = _compact(html, "item_cold"), _compact(html, "warm")
    # APLT = 1 and ARP = 0 for every model in item_cold: out of that table, in the others
    assert 'href="#metric-aplt"' not in item_cold and 'href="#metric-arp"' not in item_cold
    assert 'href="#metric-aplt"' in warm and 'href="#metric-arp"' not in warm   # APLT answers for ARP
    assert "arp in warm, user_cold, user_item_cold: aplt is shown for the same question" in acc
    assert "n_query" not in item_cold and "n_query" not in warm
    assert acc.count("n_query: a count") == 1  # the omission is said once, not per scenario
    assert "arp, aplt in item_cold: the same value for every model (constant by construction)" in html.replace(
        "aplt, arp", "arp, aplt")
    # every metric is still in the scenario's full table
    full = acc.split('<h3 id="accuracy-item_cold">')[1].split("<details>")[1]
    assert 'href="#metric-aplt"' in full and 'href="#metric-n-query"' in full
    # families in the registry's order
    assert warm.index(">rating error<") < warm.index(">ranking<") < warm.index(">lists and exposure<")


def test_best_marks_follow_the_registry_direction(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    ctx = build_context(root, _params(root))
    summary = json.loads((root / "metrics" / "summary.json").read_text())
    for metric, pick in (("aplt", max), ("novelty", max), ("mae", min), ("list_ndcg@10", max)):
        recs = [r for r in summary["records"] if r["kind"] == "accuracy" and r["scenario"] == "warm"
                and r["metric"] == metric]
        expected = pick(recs, key=lambda r: r["mean"])["model"]
        s = next(s for s in ctx["accuracy"]["scenarios"] if s["scenario"] == "warm")
        row = next(r for fam in s["families"] for r in fam["metrics"] if r["metric"] == metric)
        assert [mod for mod, c in zip(s["models"], row["cells"]) if c["best"]] == [expected], metric
    html = render_report(ctx)
    cell = _compact(html, "warm").split('href="#metric-mae"')[1].split("</tr>")[0]
    best = min(r["mean"] for r in summary["records"] if r["kind"] == "accuracy" and r["scenario"] == "warm"
               and r["metric"] == "mae")
    assert f"<b>{best:.4g}</b>" in cell


def test_every_internal_link_has_a_target_and_metrics_link_to_the_glossary(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    html = _render(root)
    ids = set(re.findall(r'\sid="([^"]+)"', html))
    hrefs = set(re.findall(r'href="#([^"]+)"', html))
    assert hrefs and hrefs <= ids, sorted(hrefs - ids)
    glossary = _section(html, "Glossary")
    from audit import registry

    summary = json.loads((root / "metrics" / "summary.json").read_text())
    for name in {r["metric"] for r in summary["records"] if r["kind"] == "accuracy"}:
        entry = registry.lookup(name)
        assert f'id="{registry.anchor(name)}"' in glossary and str(escape(entry.definition)) in glossary
    for test_anchor in ("test-bh", "test-permutation", "test-holm", "interval-seeds", "interval-users"):
        assert f'id="{test_anchor}"' in glossary and f'href="#{test_anchor}"' in html


def test_every_heading_has_content(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    html = _render(root)
    # a heading directly followed by another heading or the end of its section is empty
    empty = re.findall(r"<h([23])[^>]*>(.*?)</h\1>\s*(?=<h[23][ >]|</section>)", html, flags=re.S)
    assert not empty, empty
    shift = _section(html, "Robustness").split("<h3>demographic_shift</h3>")[1]
    assert "F=0.5,M=0.5" in shift.split("</table>")[0]  # the named-level perturbation has its table


def test_detail_is_collapsed_with_counts(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    html = _render(root)
    assert "<details open" not in html  # everything collapsed on a deterministic run
    ctx = build_context(root, _params(root))
    s = next(s for s in ctx["accuracy"]["scenarios"] if s["scenario"] == "user_cold")
    n_sig = sum(c["better"] != "tie" for c in s["comparisons"])
    assert (f"<summary>Comparisons in user_cold: {len(s['comparisons'])}, of which {n_sig} significant after Holm"
            "</summary>") in html
    fairness = json.loads((root / "metrics" / "fairness.json").read_text())
    occ = [r for r in fairness["records"] if r["kind"] == "group_metric" and r["model"] == "melu"
           and r["scenario"] == "user_cold" and r["metric"] == "mae" and r["attribute"] == "occupation"]
    small = sum(r["n"] < fairness["min_group_size"] for r in occ)
    assert small and f"<summary>occupation: {len(occ)} groups, {small} below the minimum size</summary>" in html


def _matrix(html: str) -> str:
    return html.split('<table class="matrix">')[1].split("</table>")[0]


def test_fairness_matrix_lists_the_gaps_that_survive_adjustment(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    fairness = json.loads((root / "metrics" / "fairness.json").read_text())
    gaps = [r for r in fairness["records"] if r["kind"] == "gap"]
    # an insufficient record is never a finding, however small its p
    planted = next(g for g in gaps if g["model"] == "pop" and g["attribute"] == "gender" and g["metric"] == "mae")
    planted.update(p_adjusted=1e-6, significant=True, insufficient=True)
    _write(root, "fairness", fairness)
    html = _render(root)
    rows = re.findall(r"<tr[^>]*><td>([^<]+)</td><td>([^<]+)</td>(.*?)</tr>", _matrix(html), flags=re.S)
    expected = {(g["model"], g["scenario"], g["attribute"]) for g in gaps
                if g["p_adjusted"] < 0.05 and not g.get("insufficient")}
    found = set()
    attributes = ["gender", "age", "occupation"]
    for model, scenario, cells in rows:
        for attr, cell in zip(attributes, re.findall(r"<td>(.*?)</td>", cells, flags=re.S)):
            if "gapfound" in cell:
                found.add((model, scenario, attr))
    assert expected and found == expected
    assert f"{len([g for g in gaps if g['p_adjusted'] < 0.05 and not g.get('insufficient')])} of {len(gaps)} gap tests survive adjustment" in html
    cell = next(c for m_, s_, c in rows if m_ == "pop" and s_ == planted["scenario"])
    assert "insufficient" in cell


def test_no_gap_surviving_is_said_and_older_records_render(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    fairness = json.loads((root / "metrics" / "fairness.json").read_text())
    for r in fairness["records"]:
        if r["kind"] == "gap":
            r.update(p_adjusted=0.5, significant=False)
    _write(root, "fairness", fairness)
    html = _render(root)
    assert "No gap survives adjustment (" in html and "gapfound" not in _matrix(html)
    # a file from before the statistics rewrite: no p_adjusted, no insufficient, exposure's `gini`
    for r in fairness["records"]:
        for k in ("p_adjusted", "significant", "insufficient", "adjustment", "family"):
            r.pop(k, None)
        if r["kind"] == "exposure":
            r["gini"] = r.pop("exposure_gini")
    fairness.pop("min_group_size")
    _write(root, "fairness", fairness)
    ctx = build_context(root, _params(root))
    html = render_report(ctx)
    assert "carry no adjusted p-values" in html and "gapfound" not in _matrix(html)
    value = ctx["fairness"]["exposure"][0]["gini"]
    assert ctx["fairness"]["exposure"][0]["exposure_gini"] == value and f"{value:.3g}" in html


def test_insufficient_groups_are_marked_and_never_bold(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    html = _render(root)
    fair = _section(html, "Fairness")
    small_rows = re.findall(r'<tr class="small">(.*?)</tr>', fair, flags=re.S)
    assert small_rows and all("insufficient (n = " in r and "<b>" not in r for r in small_rows)
    assert "insufficient (n = 7)" in fair  # doctor and homemaker in the fixture
    data = _section(html, "Data")
    assert "insufficient (n = 9)" in data


def test_last_release_section(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    assert "No comparison: no baseline configured" in _section(_render(root), "Against the last release")
    _write(root, "regression", {"verdict": None, "baseline": None, "records": []})
    assert "No comparison: no baseline configured" in _section(_render(root), "Against the last release")
    _write(root, "regression", {"verdict": "fail", "baseline": "releases/v6", "records": [
        {"kind": "accuracy_change", "scenario": "user_cold", "metric": "mae", "new": 0.85, "old": 0.84,
         "change": 0.01, "ci_low": 0.004, "ci_high": 0.016, "margin": 0.005, "outcome": "fail", "interval": "95%"},
        {"kind": "gap_change", "scenario": "user_cold", "attribute": "gender", "metric": "mae", "gap_new": 0.05,
         "gap_old": 0.04, "change": 0.01, "ci_low": -0.01, "ci_high": 0.03, "margin": 0.02, "outcome": "inconclusive"}]})
    part = _section(_render(root), "Against the last release")
    assert "releases/v6" in part and "<b>fail</b>" in part and "2 changes not passing" in part
    assert "[0.004, 0.016]" in part and "Fairness gap changes: 1, of which 1 not passing" in part


def test_feedback_section_only_when_its_file_exists(tmp_path: Path) -> None:
    root = write_fixture_project(tmp_path)
    assert "<h2>Feedback loop</h2>" not in _render(root)
    curve = {"kind": "curve", "oracle": "gbdt", "model": "melu", "policy": "greedy", "metric": "utility_shown",
             "attribute": "all", "group": "all", "ci_low": 3.9, "ci_high": 4.1, "n": 50}
    growth = {"kind": "gap_growth", "oracle": "gbdt", "model": "melu", "policy": "greedy", "metric": "utility_shown",
              "attribute": "gender", "group": XSS_SCRIPT, "gap_start": 0.05, "gap_end": 0.02, "growth": -0.03,
              "ci_low": -0.06, "ci_high": 0.01, "p_adjusted": 0.4}
    _write(root, "feedback", {
        "config": {"oracles": ["gbdt"], "models": ["melu"], "rounds": 1, "k": 10, "scenario": "user_cold",
                   "seeds": [0, 1]},
        "oracles": [{"oracle": "gbdt", "sigma": 0.96, "fit_rmse": 0.83}],
        "headline": [{"oracle": "gbdt", "model": "melu", "policy": "greedy", "attribute": "gender", "group": "F",
                      "utility_shown@round0": [4.33, 4.28, 4.38], "utility_shown@round1": [4.27, 4.22, 4.32]}],
        "records": [{**curve, "round": 0, "mean": 4.0}, {**curve, "round": 1, "mean": 4.1}, growth]})
    html = _render(root)
    part = _section(html, "Feedback loop")
    assert "<h2>Feedback loop</h2>" in html and "4.27" in part and "[4.22, 4.32]" in part
    assert "-0.03" in part
    _assert_only_escaped_script(html)


def _assert_only_escaped_script(html: str) -> None:
    assert "<script" not in html.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_summary_command_fits_a_terminal(tmp_path: Path, capsys) -> None:
    from audit.report import key_findings

    root = write_fixture_project(tmp_path, gates_pass=False)
    assert main(["--root", str(root), "summary"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) < 40
    assert "gates: FAILED (3 of 4 pass)" in out
    gate = json.loads((root / "metrics" / "gate.json").read_text())
    for g in gate["records"]:
        line = next(x for x in lines if f" {g['name']}: " in x)
        assert line.split()[0] == g["outcome"].upper()
        if g["interval"]:
            assert f"interval {g['interval_low']:.4g} to {g['interval_high']:.4g}" in line
    findings = key_findings(root, _params(root))
    assert findings and all(f"  - {f}" in lines for f in findings)
    failed = next(g for g in gate["records"] if g["outcome"] == "fail")
    assert failed["message"] in out


def test_summary_command_caps_many_gates(tmp_path: Path, capsys) -> None:
    root = write_fixture_project(tmp_path)
    gate_path = root / "metrics" / "gate.json"
    gate = json.loads(gate_path.read_text())
    extra = [{**g, "name": f"{g['name']}_{i}", "outcome": "fail", "passed": False, "message": "too high"}
             for i in range(20) for g in gate["records"][:1]]
    gate["records"] += extra
    gate_path.write_text(json.dumps(gate))
    assert main(["--root", str(root), "summary"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 40 and any("more (see reports/gate.md)" in x for x in lines)


def test_summary_with_the_old_catalogue_ndcg_name_renders(tmp_path: Path) -> None:
    # runs before the rename wrote the catalogue nDCG as `ndcg@10`: still one compact ranking row per family
    root = write_fixture_project(tmp_path)
    summary = json.loads((root / "metrics" / "summary.json").read_text())
    for r in summary["records"]:
        if r.get("metric") == "list_ndcg@10":
            r["metric"] = "ndcg@10"
    _write(root, "summary", summary)
    html = _render(root)
    warm = _compact(html, "warm")
    assert ">ndcg@10</a>" in warm and ">ndcg@5</a>" not in warm and "list_ndcg@10" not in warm
    assert "ndcg@1, ndcg@3, ndcg@5: another cut-off of the same metric, ndcg@10, is shown" in html
