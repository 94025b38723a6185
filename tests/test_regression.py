"""Gate a candidate against the last signed release: identical passes, planted regressions fail
with their interval, and a tampered baseline or one audited on other data is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audit import signing
from audit.cli import main as cli
from audit.regression import RegressionInputError, accuracy_change, compare, gap_change
from tests.fixtures_metrics import write_fixture_project

MARGINS = {"mae": 0.005, "gap": 0.02}


@pytest.fixture()
def release(tmp_path: Path, monkeypatch, capsys) -> Path:
    """A signed release audit under tmp/release (its key pair under tmp/keys)."""
    assert cli(["keygen", "--out", str(tmp_path / "keys")]) == 0
    root = write_fixture_project(tmp_path / "release")
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "keys" / "signing.key"))
    assert cli(["--root", str(root), "report"]) == 0
    assert cli(["--root", str(root), "sign"]) == 0
    capsys.readouterr()
    return root


def _candidate(tmp_path: Path, release: Path) -> Path:
    root = tmp_path / "candidate"
    shutil.copytree(release, root, ignore=shutil.ignore_patterns("reports"))
    return root


def _params(tmp_path: Path) -> dict:
    return {"meta_learner": "melu", "strata": {"min_group_size": 5}, "evaluation": {"bootstrap": 2000, "seed": 0},
            "baseline": {"audit_dir": "../release", "bundle": "../release/reports/audit.bundle.json",
                         "key": "../keys/signing.pub", "model": "melu", "margins": MARGINS}}


STRATA = pd.DataFrame({"user_id": range(1, 21), "gender": ["F", "M"] * 10})


def _shift(root: Path, amount, model: str = "melu") -> None:
    """Add `amount` (a number, or a function of user_id) to the model's per-user MAE."""
    path = root / "results" / "per_user.parquet"
    f = pd.read_parquet(path)
    rows = f["model"] == model
    add = f.loc[rows, "user_id"].map(amount) if callable(amount) else amount
    f.loc[rows, "value"] = f.loc[rows, "value"] + add
    f.to_parquet(path)


def test_identical_candidate_passes_with_a_zero_change(tmp_path: Path, release: Path) -> None:
    root = _candidate(tmp_path, release)
    doc = compare(root, _params(tmp_path), STRATA)
    assert doc["verdict"] == "pass"
    acc = [r for r in doc["records"] if r["kind"] == "accuracy_change"]
    gaps = [r for r in doc["records"] if r["kind"] == "gap_change"]
    assert {r["scenario"] for r in acc} == {"warm", "user_cold", "item_cold", "user_item_cold"}
    assert all(r["change"] == 0 and r["ci_low"] == r["ci_high"] == 0 and r["outcome"] == "pass" for r in acc)
    assert len(gaps) == 4 and all(r["change"] == 0 and r["outcome"] == "pass" for r in gaps)


def test_planted_regression_fails_with_its_interval(tmp_path: Path, release: Path) -> None:
    root = _candidate(tmp_path, release)
    _shift(root, lambda u: 0.05 + 0.03 * (u % 3 - 1))     # worse by 0.05 on average, unevenly
    doc = compare(root, _params(tmp_path), STRATA)
    acc = next(r for r in doc["records"] if r["kind"] == "accuracy_change" and r["scenario"] == "user_cold")
    assert doc["verdict"] == "fail" and acc["outcome"] == "fail"
    assert acc["change"] == pytest.approx(0.05 + 0.03 * (sum(u % 3 - 1 for u in range(1, 21)) / 20))
    assert 0.005 < acc["ci_low"] < acc["change"] < acc["ci_high"] < 0.1
    assert acc["interval"].startswith("two-sided 90% interval")


def test_planted_gap_growth_fails_and_accuracy_gain_is_not_a_regression(tmp_path: Path, release: Path) -> None:
    root = _candidate(tmp_path, release)
    _shift(root, lambda u: 0.1 if u % 2 == 0 else -0.4)   # men (even ids) worse, women much better
    doc = compare(root, _params(tmp_path), STRATA)
    acc = next(r for r in doc["records"] if r["kind"] == "accuracy_change" and r["scenario"] == "warm")
    gap = next(r for r in doc["records"] if r["kind"] == "gap_change" and r["scenario"] == "warm")
    assert acc["outcome"] == "pass" and acc["change"] == pytest.approx(-0.15)
    assert gap["outcome"] == "fail" and gap["ci_low"] > MARGINS["gap"]


def test_tampered_baseline_is_refused(tmp_path: Path, release: Path) -> None:
    root = _candidate(tmp_path, release)
    _shift(release, 0.001)
    with pytest.raises(RegressionInputError, match=r"baseline bundle ../release/reports/audit.bundle.json does not "
                                                   r"verify with ../keys/signing.pub: subject results/per_user.parquet: "
                                                   r"sha256 mismatch"):
        compare(root, _params(tmp_path), STRATA)


def test_baseline_audited_on_other_data_is_refused(tmp_path: Path, release: Path, monkeypatch) -> None:
    root = _candidate(tmp_path, release)
    prov = json.loads((root / "metrics" / "provenance.json").read_text())
    (root / "metrics" / "provenance.json").write_text(json.dumps({**prov, "data_canonical_sha256": "e" * 64}))
    with pytest.raises(RegressionInputError, match=r"the baseline audit used other data \(canonical ratings "
                                                   r"checksum\): dddddddddddddddd\.\.\. against this audit's "
                                                   r"eeeeeeeeeeeeeeee\.\.\."):
        compare(root, _params(tmp_path), STRATA)


def test_refusal_stops_the_stage_with_exit_2(tmp_path: Path, release: Path, capsys) -> None:
    from pipelines.common import stage

    root = _candidate(tmp_path, release)
    _shift(release, 0.001)

    @stage
    def run() -> None:
        compare(root, _params(tmp_path), STRATA)

    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: baseline bundle ../release/reports/audit.bundle.json does not verify")


def test_no_baseline_is_an_empty_comparison(tmp_path: Path) -> None:
    assert compare(tmp_path, {"baseline": None}, STRATA) == {
        "baseline": None, "note": "no baseline configured (params.yaml baseline)", "records": []}


def test_non_inferiority_interval_covers_under_the_null() -> None:
    """Equal models, seed and user noise, 3 seeds: the 90% interval covers 0 about 90% of the time
    (a percentile bootstrap over the 3 seeds covered 69% here)."""
    rng = np.random.default_rng(0)
    hits = 0
    n = 300
    for i in range(n):
        users = rng.normal(0.8, 0.2, 150)
        new = pd.DataFrame(users + rng.normal(0, 0.01, (3, 150)) + rng.normal(0, 0.01, (3, 1)))
        old = pd.DataFrame(users + rng.normal(0, 0.01, (3, 150)) + rng.normal(0, 0.01, (3, 1)))
        r = accuracy_change(new, old, "mae", 0.005)
        hits += r["ci_low"] <= 0 <= r["ci_high"]
    assert 0.86 <= hits / n <= 0.95, hits / n   # nominal 0.90; 300 draws: MC sd 0.017


def test_gap_change_needs_two_groups_of_sufficient_size() -> None:
    new = old = pd.DataFrame(np.ones((2, 6)), columns=range(6))
    assert gap_change(new, old, pd.Series(["a"] * 5 + ["b"], index=range(6)), 0.02, min_size=5, n_boot=10,
                      seed=0) is None


# --- under evaluation.sample: the same sample on both sides, design-weighted means -------------------

# Four sampling strata of five sampled users each, nested in gender (odd ids F), with unequal weights.
SAMPLE_WEIGHT = {1: 6.0, 3: 2.0, 0: 1.0, 2: 3.0}       # by user_id % 4


def _write_sample(root: Path) -> None:
    """data/tasks/sample.parquet and sample.json as the tasks stage writes them, for every scenario."""
    from audit.sampling import SAMPLE_FILE, SAMPLE_JSON

    rows = [{"scenario": sc, "user_id": u, "stratum": u % 4, "sampled": True, "weight": SAMPLE_WEIGHT[u % 4]}
            for sc in ("warm", "user_cold", "item_cold", "user_item_cold") for u in range(1, 21)]
    # the unsampled users: N_h = 5 * weight per stratum, of whom 5 were drawn
    extra = [{"scenario": r["scenario"], "user_id": 1000 + 100 * r["stratum"] + k, "stratum": r["stratum"],
              "sampled": False, "weight": 0.0}
             for r in rows if r["user_id"] <= 4 for k in range(int(5 * r["weight"]) - 5)]
    (root / "data" / "tasks").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows + extra).to_parquet(root / "data" / "tasks" / SAMPLE_FILE)
    (root / "data" / "tasks" / SAMPLE_JSON).write_text(json.dumps({"rule": {"max_per_group": 5}, "seed": 0,
                                                                   "scenarios": {}}))


@pytest.fixture()
def sampled_release(tmp_path: Path, monkeypatch, capsys) -> Path:
    """A signed release audit that scored the sample of `_write_sample` (its digest in its provenance)."""
    from audit.provenance import sample_digest

    assert cli(["keygen", "--out", str(tmp_path / "keys")]) == 0
    root = write_fixture_project(tmp_path / "release")
    _write_sample(root)
    prov = json.loads((root / "metrics" / "provenance.json").read_text())
    prov["sample_sha256"] = sample_digest(root / "data" / "tasks")
    (root / "metrics" / "provenance.json").write_text(json.dumps(prov))
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "keys" / "signing.key"))
    assert cli(["--root", str(root), "report"]) == 0
    assert cli(["--root", str(root), "sign"]) == 0
    capsys.readouterr()
    return root


def _weighted_gap(per_user: pd.DataFrame, scenario: str) -> float:
    """Plain pandas: design-weighted MAE by gender over users and seeds, largest minus smallest."""
    f = per_user[(per_user.model == "melu") & (per_user.scenario == scenario) & (per_user.metric == "mae")]
    u = f.groupby("user_id")["value"].mean().reset_index()
    u["w"] = (u.user_id % 4).map(SAMPLE_WEIGHT)
    u["g"] = np.where(u.user_id % 2 == 1, "F", "M")
    means = u.groupby("g").apply(lambda x: (x.value * x.w).sum() / x.w.sum(), include_groups=False)
    return float(means.max() - means.min())


def test_sampled_comparison_is_design_weighted(tmp_path: Path, sampled_release: Path) -> None:
    root = _candidate(tmp_path, sampled_release)
    _shift(root, lambda u: 0.2 if u % 4 == 1 else 0.0)    # worse only in the heaviest stratum
    doc = compare(root, _params(tmp_path), STRATA)
    acc = next(r for r in doc["records"] if r["kind"] == "accuracy_change" and r["scenario"] == "warm")
    # weighted: 30 of 60 represented users worse by 0.2 -> 0.1 (unweighted it would be 5 of 20 -> 0.05)
    assert acc["change"] == pytest.approx(0.1) and acc["n_users"] == 20
    assert "design weights" in acc["interval"] and acc["ci_low"] < 0.1 < acc["ci_high"]
    gap = next(r for r in doc["records"] if r["kind"] == "gap_change" and r["scenario"] == "warm")
    old = pd.read_parquet(sampled_release / "results" / "per_user.parquet")
    new = pd.read_parquet(root / "results" / "per_user.parquet")
    assert gap["gap_new"] == pytest.approx(_weighted_gap(new, "warm"))
    assert gap["gap_old"] == pytest.approx(_weighted_gap(old, "warm"))
    assert "sampling strata" in gap["interval"]


def test_sampled_identical_candidate_is_exactly_unchanged(tmp_path: Path, sampled_release: Path) -> None:
    doc = compare(_candidate(tmp_path, sampled_release), _params(tmp_path), STRATA)
    acc = [r for r in doc["records"] if r["kind"] == "accuracy_change"]
    assert doc["verdict"] == "pass" and all(r["change"] == 0 and r["ci_low"] == r["ci_high"] == 0 for r in acc)


def test_baseline_on_another_sample_is_refused(tmp_path: Path, release: Path) -> None:
    from audit.provenance import sample_digest

    root = _candidate(tmp_path, release)
    _write_sample(root)
    prov = json.loads((root / "metrics" / "provenance.json").read_text())
    digest = sample_digest(root / "data" / "tasks")
    (root / "metrics" / "provenance.json").write_text(json.dumps({**prov, "sample_sha256": digest}))
    with pytest.raises(RegressionInputError, match=rf"^the baseline audit used other evaluation sample: none against "
                                                   rf"this audit's {digest[:16]}\.\.\.; a paired comparison needs the "
                                                   rf"same users and ratings$"):
        compare(root, _params(tmp_path), STRATA)


def test_sampled_non_inferiority_interval_covers_the_population_change() -> None:
    """Null simulation with realistic unequal strata: 2,000 / 600 / 150 users with per-user change
    spreads 0.2 / 0.5 / 0.8 and different means, sampled 40 / 60 / 100 (a maximum per group takes
    small groups nearly whole), three seeds with seed and seed-by-user noise. The design-weighted
    90% interval covers the population's change about 90% of the time (a little more: the seed
    part is conservative); the unweighted one, which ignores the design, is biased and seldom does."""
    rng = np.random.default_rng(7)
    sizes, rates, mus, sds = np.array([2000, 600, 150]), np.array([40, 60, 100]), np.array([0.0, 0.2, -0.4]), \
        np.array([0.2, 0.5, 0.8])
    target = float((sizes * mus).sum() / sizes.sum())
    population = pd.Series(sizes, index=range(3))
    hits = naive = 0
    reps = 600
    for _ in range(reps):
        strata = np.repeat(np.arange(3), rates)
        d = rng.normal(mus[strata], sds[strata])                   # sampled users' true changes
        base = rng.normal(0.8, 0.2, strata.size)
        old = base + rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.2, (3, strata.size))
        new = base + d + rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.2, (3, strata.size))
        design = pd.DataFrame({"stratum": strata, "weight": sizes[strata] / rates[strata]})
        r = accuracy_change(pd.DataFrame(new), pd.DataFrame(old), "mae", 0.005, design=design, population=population)
        hits += r["ci_low"] <= target <= r["ci_high"]
        u = accuracy_change(pd.DataFrame(new), pd.DataFrame(old), "mae", 0.005)
        naive += u["ci_low"] <= target <= u["ci_high"]
    assert 0.87 <= hits / reps <= 0.95, hits / reps          # nominal 0.90; 600 draws: MC sd 0.012
    assert naive / reps < 0.4, naive / reps                 # 0.25 here: three seeds keep every interval wide


def test_a_stratum_left_with_one_scored_user_is_inconclusive() -> None:
    """Stratum 1 has 40 users in the population but only one with a finite value in both audits:
    its variance is unknown, so the change has no interval and cannot pass."""
    users = list(range(6))
    new = pd.DataFrame([[0.8, 0.9, 0.7, 1.0, 0.6, np.nan]], columns=users)
    old = pd.DataFrame([[0.8, 0.8, 0.8, 0.8, 0.8, 0.8]], columns=users)
    design = pd.DataFrame({"stratum": [0, 0, 0, 0, 1, 1], "weight": [2.5] * 4 + [20.0] * 2}, index=users)
    r = accuracy_change(new, old, "mae", 0.005, design=design, population=pd.Series({0: 10, 1: 40}))
    assert r["outcome"] == "inconclusive" and r["ci_low"] is None and r["ci_high"] is None
    assert r["change"] == pytest.approx((10 * 0.05 + 40 * -0.2) / 50)


def test_sampled_variance_reduces_to_the_two_way_formula_when_everyone_is_taken() -> None:
    """One stratum taken whole, equal weights: the design-weighted interval is the unsampled one."""
    gen = np.random.default_rng(2)
    users = list(range(50))
    base_ = gen.normal(0.8, 0.2, 50)
    new = pd.DataFrame(base_ + gen.normal(0, 0.1, (3, 50)) + gen.normal(0.01, 0.02, (3, 1)), columns=users)
    old = pd.DataFrame(base_ + gen.normal(0, 0.1, (3, 50)), columns=users)
    plain = accuracy_change(new, old, "mae", 0.005)
    design = pd.DataFrame({"stratum": 0, "weight": 1.0}, index=users)
    sampled = accuracy_change(new, old, "mae", 0.005, design=design, population=pd.Series({0: 50}))
    for key in ("new", "old", "change", "ci_low", "ci_high", "df"):
        assert sampled[key] == pytest.approx(plain[key], rel=1e-9), key


def test_sampled_new_minus_old_is_the_change_when_a_user_drops_out() -> None:
    """A user without a finite value leaves its stratum's other users carrying the stratum's share."""
    users = list(range(6))
    new = pd.DataFrame([[1.0, 1.2, 0.9, 1.1, 2.0, np.nan], [1.1, 1.0, 0.8, 1.2, 2.2, 1.0]], columns=users)
    old = pd.DataFrame([[0.9, 1.0, 1.0, 1.0, 1.5, 1.2], [0.8, 1.1, 0.9, 1.0, 1.9, 1.1]], columns=users)
    design = pd.DataFrame({"stratum": [0, 0, 0, 0, 1, 1], "weight": [5.0] * 4 + [15.0] * 2}, index=users)
    r = accuracy_change(new, old, "mae", 0.005, design=design, population=pd.Series({0: 20, 1: 30}))
    per_user_new, per_user_old = new.mean().to_numpy(), old.mean().to_numpy()
    want_new = 0.4 * per_user_new[:4].mean() + 0.6 * per_user_new[4]       # stratum 1: only user 4 scored
    want_old = 0.4 * per_user_old[:4].mean() + 0.6 * per_user_old[4]
    assert r["new"] == pytest.approx(want_new) and r["old"] == pytest.approx(want_old)
    assert r["change"] == pytest.approx(want_new - want_old)


def test_a_stratum_without_scored_users_is_inconclusive_and_counted() -> None:
    users = list(range(4))
    new = pd.DataFrame([[0.8, 0.9, np.nan, np.nan]], columns=users)
    old = pd.DataFrame([[0.8, 0.8, 0.8, 0.8]], columns=users)
    design = pd.DataFrame({"stratum": [0, 0, 1, 1], "weight": [5.0, 5.0, 10.0, 10.0]}, index=users)
    r = accuracy_change(new, old, "mae", 0.005, design=design, population=pd.Series({0: 10, 1: 20}))
    assert r["outcome"] == "inconclusive" and r["change"] is None and r["strata_without_scored_users"] == 1
    with pytest.raises(ValueError, match=r"^accuracy_change: a sampling design needs its population"):
        accuracy_change(new, old, "mae", 0.005, design=design)
