"""A stratified sample of evaluation users (audit.sampling): the estimator against textbook
formulas, the coverage of its interval under repeated sampling from one finite population, the
allocation (floors, half-width), seeded draws, the within-strata bootstrap, and the loader every
scoring stage uses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from audit.sampling import (SampleRule, allocate, domain_contrast, draw, sample_scenario, stratified_mean,
                            stratified_user_weights)
from metarec.prepared import SAMPLE_FILE, load_evaluation_split


def test_known_answer_by_hand() -> None:
    # A: N=10, sample 1, 2, 3 (mean 2, s^2 1); B: N=20, sample 4, 6 (mean 5, s^2 2).
    r = stratified_mean([1, 2, 3, 4, 6], ["A", "A", "A", "B", "B"], {"A": 10, "B": 20})
    assert r["estimate"] == pytest.approx((10 * 2 + 20 * 5) / 30)
    # Cochran 5.6: sum W^2 (1 - f) s^2 / n = (1/3)^2 (0.7)(1/3) + (2/3)^2 (0.9)(2/2)
    assert r["var_sampling"] == pytest.approx(1 / 9 * 0.7 / 3 + 4 / 9 * 0.9)
    assert r["variance"] == pytest.approx(1 / 9 / 3 + 4 / 9 * 2 / 2)
    assert (r["n"], r["N"], r["n_strata"]) == (5, 30, 2)


def test_matches_plain_numpy_formulas() -> None:
    rng = np.random.default_rng(3)
    big_n = {0: 500, 1: 80, 2: 12, 3: 200}
    n = {0: 40, 1: 20, 2: 12, 3: 5}
    strata = np.concatenate([np.full(n[h], h) for h in big_n])
    values = rng.gamma(2.0, 0.4, strata.size) * (1 + strata)
    r = stratified_mean(values, strata, big_n)
    total = sum(big_n.values())
    est = var_s = var_p = 0.0
    terms = []
    for h, nh in big_n.items():
        y = values[strata == h]
        w = nh / total
        s2 = y.var(ddof=1)     # a stratum taken whole still has its population part
        est += w * y.mean()
        var_s += w * w * (1 - len(y) / nh) * s2 / len(y)
        var_p += w * w * s2 / len(y)
        terms.append((w * w * (1 - len(y) / nh) * s2 / len(y), len(y)))
    df = var_s ** 2 / sum(t ** 2 / (m - 1) for t, m in terms)
    from scipy import stats

    assert r["estimate"] == pytest.approx(est, rel=1e-12)
    assert r["var_sampling"] == pytest.approx(var_s, rel=1e-12)
    assert r["variance"] == pytest.approx(var_p, rel=1e-12)
    assert r["df_sampling"] == pytest.approx(df, rel=1e-9)
    half = stats.t.ppf(0.975, df) * np.sqrt(var_s)
    assert (r["ci_sampling_low"], r["ci_sampling_high"]) == pytest.approx((est - half, est + half), rel=1e-9)


def test_a_stratum_without_values_is_an_error_and_a_whole_stratum_has_no_sampling_variance() -> None:
    with pytest.raises(ValueError, match="stratum 'B' has no finite sampled value"):
        stratified_mean([1.0, 2.0, np.nan], ["A", "A", "B"], {"A": 5, "B": 3})
    r = stratified_mean([1.0, 2.0, 3.0], ["A", "A", "A"], {"A": 3})
    assert r["var_sampling"] == 0.0 and r["ci_sampling_low"] == r["ci_sampling_high"] == pytest.approx(2.0)


def _population(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fixed finite population: realistic group sizes, unequal spreads, skewed values."""
    sizes = [900, 420, 150, 60, 25, 9]
    spread = [0.45, 0.8, 1.3, 0.6, 1.8, 2.5]
    strata = np.concatenate([np.full(s, h) for h, s in enumerate(sizes)])
    values = np.concatenate([0.4 + h * 0.05 + rng.gamma(1.5, sd / np.sqrt(1.5), s)
                             for h, (s, sd) in enumerate(zip(sizes, spread))])
    return strata, values


def test_interval_covers_the_full_evaluation_value_under_repeated_sampling() -> None:
    """Null simulation: 2,000 stratified samples from one fixed population; the 95% interval with the
    finite population correction covers the population mean at least 93% of the time, and the
    population-target interval (wider) does too."""
    rng = np.random.default_rng(18)
    strata, values = _population(rng)
    big_n = pd.Series(strata).value_counts().sort_index()
    n = {0: 40, 1: 30, 2: 25, 3: 20, 4: 12, 5: 9}          # the last stratum taken whole
    truth = values.mean()
    pos = {h: np.flatnonzero(strata == h) for h in big_n.index}
    hit_s = hit_p = 0
    draws = 2000
    for _ in range(draws):
        idx = np.concatenate([rng.choice(pos[h], n[h], replace=False) for h in big_n.index])
        r = stratified_mean(values[idx], strata[idx], big_n)
        hit_s += r["ci_sampling_low"] <= truth <= r["ci_sampling_high"]
        hit_p += r["ci_low"] <= truth <= r["ci_high"]
    assert hit_s / draws >= 0.93, hit_s / draws
    assert hit_p / draws >= hit_s / draws


def _draw(rng: np.random.Generator, strata: np.ndarray, n: dict) -> tuple[np.ndarray, np.ndarray]:
    """A stratified simple random sample: positions and design weights N_h / n_h."""
    idx = np.concatenate([rng.choice(np.flatnonzero(strata == h), n[h], replace=False) for h in sorted(n)])
    big_n = np.bincount(strata)
    return idx, big_n[strata[idx]] / np.array([n[h] for h in strata[idx]], dtype=float)


def test_a_domain_made_of_whole_strata_is_the_stratified_mean() -> None:
    rng = np.random.default_rng(4)
    strata, values = _population(rng)
    idx, w = _draw(rng, strata, {0: 40, 1: 30, 2: 25, 3: 20, 4: 12, 5: 9})
    dom = np.isin(strata[idx], [1, 2, 4])
    est, se, df = domain_contrast(values[idx], strata[idx], w, [dom])
    ref = stratified_mean(values[idx][dom], strata[idx][dom], pd.Series(np.bincount(strata))[[1, 2, 4]])
    assert est == pytest.approx(ref["estimate"], rel=1e-12)
    assert se ** 2 == pytest.approx(ref["variance"], rel=1e-10)
    assert df == pytest.approx(min(ref["df"], dom.sum() - 1), rel=1e-9)
    # a contrast of two disjoint unions of strata: the variances add (independent strata)
    est2, se2, _ = domain_contrast(values[idx], strata[idx], w, [dom, ~dom], (1.0, -1.0))
    ref2 = stratified_mean(values[idx][~dom], strata[idx][~dom], pd.Series(np.bincount(strata))[[0, 3, 5]])
    assert est2 == pytest.approx(ref["estimate"] - ref2["estimate"], rel=1e-12)
    assert se2 ** 2 == pytest.approx(ref["variance"] + ref2["variance"], rel=1e-10)


def test_domain_contrast_by_hand() -> None:
    # stratum 0: N=20, users (y, in D) (1, T), (3, F); stratum 1: N=6, users (2, T), (4, T), (6, F)
    v, h = np.array([1.0, 3.0, 2.0, 4.0, 6.0]), np.array([0, 0, 1, 1, 1])
    w, dom = np.array([10.0, 10.0, 2.0, 2.0, 2.0]), np.array([True, False, True, True, False])
    est, se, _ = domain_contrast(v, h, w, [dom])
    assert est == pytest.approx((10 * 1 + 2 * 2 + 2 * 4) / 14)
    z = np.where(dom, v - est, 0.0) / 14
    var = 20 ** 2 * z[:2].var(ddof=1) / 2 + 6 ** 2 * z[2:].var(ddof=1) / 3
    assert se ** 2 == pytest.approx(var)


def test_a_domain_contrast_across_strata_covers_under_repeated_sampling() -> None:
    """Null-free coverage simulation: the most active users (a domain that cuts across strata, with
    activity tied to the value) against the rest, 1,500 stratified samples from one fixed population
    with unequal spreads; domains of at least a dozen sampled users, as the audit's floor requires."""
    rng = np.random.default_rng(2)
    strata, values = _population(rng)
    activity = rng.gamma(1.0, 50.0, strata.size) * (1 + 0.3 * strata)
    values = values + 0.002 * activity
    active = activity >= np.quantile(activity, 0.9)
    truth = values[active].mean() - values[~active].mean()
    hits, draws = 0, 1500
    from scipy import stats

    for _ in range(draws):
        idx, w = _draw(rng, strata, {0: 40, 1: 30, 2: 25, 3: 20, 4: 12, 5: 9})
        est, se, df = domain_contrast(values[idx], strata[idx], w, [active[idx], ~active[idx]], (1.0, -1.0))
        half = stats.t.ppf(0.975, df) * se
        hits += est - half <= truth <= est + half
    assert 0.935 <= hits / draws <= 0.985, hits / draws


def test_bootstrap_resamples_within_strata_with_design_weights() -> None:
    rng = np.random.default_rng(1)
    strata = np.repeat([0, 1, 2], [30, 12, 5])
    weight = np.repeat([10.0, 4.0, 1.0], [30, 12, 5])   # N_h = 300, 48, 5
    w = stratified_user_weights(strata, weight, 4000, [0, 1])
    for h, big_n in ((0, 300), (1, 48), (2, 5)):
        assert np.allclose(w[:, strata == h].sum(axis=1), big_n)   # every replicate keeps N_h
    values = rng.normal(0, 1, strata.size) * (1 + strata)
    reps = (w @ values) / w.sum(axis=1)
    r = stratified_mean(values, strata, {0: 300, 1: 48, 2: 5})
    # the within-strata bootstrap estimates sum W^2 s^2 (n - 1) / n^2 (the population-target variance)
    expected = sum((n / 353) ** 2 * values[strata == h].var(ddof=0) / (strata == h).sum()
                   for h, n in ((0, 300), (1, 48), (2, 5)))
    assert reps.var() == pytest.approx(expected, rel=0.08)
    assert reps.var() < r["variance"]
    assert np.array_equal(w, stratified_user_weights(strata, weight, 4000, [0, 1]))


def _labels(n_users: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    labels = pd.DataFrame({
        "user_id": np.arange(1, n_users + 1),
        "gender": rng.choice(["F", "M"], n_users, p=[0.3, 0.7]),
        "age": rng.choice(["<25", "25-44", "45+", "80+"], n_users, p=[0.3, 0.45, 0.245, 0.005]),
        "activity": rng.choice(["low", "mid", "high"], n_users),
    })
    pilot = pd.Series(rng.gamma(2.0, 0.35, n_users) * np.where(labels.gender == "F", 1.5, 1.0),
                      index=labels.user_id)
    return labels, pilot


def test_allocation_honours_the_floor_and_the_maximum_per_group() -> None:
    labels, pilot = _labels(3000)
    rule = SampleRule(half_width=None, max_per_group=40, floor=25)
    design, record = sample_scenario(labels, pilot, rule, [0, 1])
    groups = pd.DataFrame(record["groups"])
    small = groups[groups.population <= 25]
    assert len(small) and (small.sampled == small.population).all()          # taken whole
    assert (groups.sampled >= np.minimum(groups.population, 40)).all()       # never below the target
    assert (groups.sampled >= np.minimum(groups.population, 25)).all()       # nor the floor
    strata = pd.DataFrame(record["strata"])
    assert (strata["sample"] >= np.minimum(strata.population, 2)).all()
    assert record["sampled"] == int(design.sampled.sum()) < 3000
    # design weights: N_h / n_h, summing to the population in each stratum
    got = design[design.sampled].groupby("stratum")["weight"].sum()
    assert np.allclose(got.to_numpy(), strata.set_index("stratum").loc[got.index, "population"].to_numpy())


def test_a_maximum_below_the_floor_is_raised_to_the_floor() -> None:
    assert SampleRule(half_width=None, max_per_group=3, floor=10).group_size(500, 1.0) == 10
    assert SampleRule(half_width=None, max_per_group=3, floor=10).group_size(8, 1.0) == 8


def test_half_width_sizing_reaches_the_target_for_every_group() -> None:
    labels, pilot = _labels(4000, seed=2)
    rule = SampleRule(half_width=0.05, max_per_group=None, floor=10)
    groups, strata = allocate(labels, pilot, rule)
    z = 1.959964
    n0 = (z * groups.pilot_sd / 0.05) ** 2
    assert (groups.required >= np.minimum(groups.population, np.ceil(n0 / (1 + n0 / groups.population)))).all()
    # The design's own variance for each group's stratified mean, from the population pilot values.
    lab = labels.assign(v=labels.user_id.map(pilot))
    atoms = lab.merge(strata, on=["gender", "age", "activity"])
    s2 = atoms.groupby("stratum")["v"].var(ddof=1).fillna(0.0)
    st = strata.set_index("stratum").assign(s2=s2)
    for _, g in groups.iterrows():
        part = st[st[g.attribute].astype(str) == g.group]
        w = part.population / part.population.sum()
        var = (w ** 2 * (1 - part["sample"] / part.population) * part.s2 / part["sample"]).sum()
        assert z * np.sqrt(var) <= 0.05 * 1.05, (g.attribute, g.group)
    assert strata["sample"].sum() < len(labels)


def test_draws_are_seeded() -> None:
    labels, pilot = _labels(2000)
    rule = SampleRule(half_width=None, max_per_group=50, floor=10)
    _, strata = allocate(labels, pilot, rule)
    a, b, c = draw(labels, strata, [0, 1]), draw(labels.sample(frac=1, random_state=4), strata, [0, 1]), \
        draw(labels, strata, [1, 1])
    pd.testing.assert_frame_equal(a, b)          # the order users arrive in does not matter
    assert not a.sampled.equals(c.sampled)       # another seed, another sample
    assert (a.groupby("stratum")["sampled"].sum().to_numpy() == strata["sample"].to_numpy()).all()


def test_rule_from_params() -> None:
    ev = {"alpha": 0.1, "sample": {"half_width": 0.02, "max_per_group": None}}
    rule = SampleRule.from_params(ev, {"min_group_size": 15})
    assert rule == SampleRule(half_width=0.02, max_per_group=None, floor=15, level=0.9)
    for off in (None, {}, {"half_width": None, "max_per_group": None}):
        assert SampleRule.from_params({"alpha": 0.05, "sample": off}, {}) is None


def test_every_scoring_stage_reads_the_same_sampled_users(tmp_path) -> None:
    """load_evaluation_split: the split restricted to the scenario's sampled users, rows in order;
    the whole split when no sample was drawn."""
    frame = pd.DataFrame({"task_id": [0, 0, 1, 1, 2], "scenario": "user_cold", "user_id": [5, 5, 7, 7, 9],
                          "item_id": [1, 2, 1, 3, 2], "rating": 4.0, "timestamp": 0,
                          "role": ["support", "query", "support", "query", "query"]})
    frame.to_parquet(tmp_path / "user_cold.parquet")
    users, items = pd.DataFrame({"user_id": [5, 7, 9]}), pd.DataFrame({"item_id": [1, 2, 3]})

    class Data:
        pass

    data = Data()
    data.users, data.items = users, items
    whole = load_evaluation_split("user_cold", data, root=tmp_path)
    pd.testing.assert_frame_equal(whole.frame, frame)
    pd.DataFrame({"scenario": ["user_cold", "user_cold", "user_cold", "warm"], "user_id": [5, 7, 9, 7],
                  "stratum": [0, 0, 1, 0], "sampled": [True, False, True, True],
                  "weight": [2.0, 0.0, 1.0, 1.0]}).to_parquet(tmp_path / SAMPLE_FILE)
    part = load_evaluation_split("user_cold", data, root=tmp_path)
    assert part.frame.user_id.tolist() == [5, 5, 9] and part.frame.index.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# params validation (audit/config.py) and the stages on a small synthetic audit
# --------------------------------------------------------------------------------------------

import copy  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from audit.config import validate_params  # noqa: E402
from metarec.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("sample, message", [
    ({"half_width": 0}, "evaluation.sample.half_width is 0; expected a value greater than 0"),
    ({"half_width": "0.01"}, "evaluation.sample.half_width is '0.01'; expected a number"),
    ({"max_per_group": 0}, "evaluation.sample.max_per_group is 0; expected a value greater than or equal to 1"),
    ({"max_per_group": 2.5}, "evaluation.sample.max_per_group is 2.5; expected an integer"),
    ({"max_per_group": 5}, "evaluation.sample.max_per_group is 5, below strata.min_group_size (10); expected at "
                           "least that floor (no group is sampled below it)"),
    ({"per_group": 50}, "evaluation.sample.per_group is not a known setting; expected only the documented keys "
                        "(check the spelling)"),
    (7, "evaluation.sample is 7; expected a mapping"),
])
def test_bad_sample_settings_are_one_sentence(sample, message: str) -> None:
    params = copy.deepcopy(BASE)
    params["evaluation"]["sample"] = sample
    with pytest.raises(ConfigError) as exc:
        validate_params(params, REPO)
    assert str(exc.value) == f"params.yaml: {message}"
    for good in (None, {"half_width": 0.01}, {"max_per_group": 10, "half_width": None}):
        params["evaluation"]["sample"] = good
        validate_params(params, REPO)


def _project(root: Path, sample: dict | None, audit_stages: tuple[str, ...] = ()) -> dict[str, str]:
    for rel in ("metarec", "audit", "pipelines"):
        os.symlink(REPO / rel, root / rel)
    params = copy.deepcopy(BASE)
    params["data"].update(source="synthetic", synthetic={"seed": 0, "n_users": 900, "n_items": 300,
                                                           "n_ratings": 30000})
    params.update(seeds=[0, 1], models=["mean", "bias"], meta_learner="bias", model_params={"mean": {}, "bias": {}})
    params["strata"].update(attributes=["gender", "activity"], intersections=[])
    params["evaluation"].update(bootstrap=100, sample=sample)
    params["robustness"].update(models=["bias"], seed=0)
    params["robustness"]["shilling"]["models"] = ["mean"]
    params["fairness"].update(models=["bias"], counterfactual_models=[])
    params["determinism"] = {"model": "bias", "seed": 0}
    params["feedback"].update(models=["bias"], seeds=[0])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=600)
    for args in [("pipelines.prepare",), ("pipelines.tasks",),
                 *[("pipelines.train", "--model", m, "--seed", s) for m in ("mean", "bias") for s in ("0", "1")],
                 ("pipelines.evaluate",), *[(f"pipelines.{stage}",) for stage in audit_stages]]:
        done = run(*args)
        assert done.returncode == 0, done.stderr[-2000:]
    return {"tasks": run("pipelines.tasks").stdout}


@pytest.mark.slow
def test_stages_score_the_same_sampled_users_for_every_model_and_seed(tmp_path: Path) -> None:
    import json

    on, off = tmp_path / "on", tmp_path / "off"
    on.mkdir(), off.mkdir()
    _project(on, {"max_per_group": 40}, ("provenance", "fairness", "robustness"))
    _project(off, {"max_per_group": None, "half_width": None}, ("provenance",))
    design = pd.read_parquet(on / "data/tasks" / SAMPLE_FILE)
    first = (on / "data/tasks" / SAMPLE_FILE).read_bytes()
    users = {}
    for m in ("mean", "bias"):
        for s in (0, 1):
            for kind in ("predictions", "rankings"):
                f = pd.read_parquet(on / f"{kind}/{m}/seed{s}.parquet")
                users[(kind, m, s)] = {sc: set(g.user_id) for sc, g in f.groupby("scenario")}
    sampled = {sc: set(g.user_id[g.sampled]) for sc, g in design.groupby("scenario")}
    assert all(u == {sc: sampled[sc] for sc in u} for u in users.values())   # same users everywhere
    assert sum(map(len, sampled.values())) < len(design)                     # and fewer than everyone
    # the tasks stage re-run (in _project) drew the same sample, byte for byte
    assert (on / "data/tasks" / SAMPLE_FILE).read_bytes() == first
    summary = json.loads((on / "metrics/summary.json").read_text())
    acc = [r for r in summary["records"] if r["kind"] == "accuracy" and r["metric"] == "mae"]
    assert acc and all(r["sample"]["n_sampled"] == r["n_users"] for r in acc)
    # the stratified mean of the per-user MAE of one seed, recomputed from the design weights
    pu = pd.read_parquet(on / "results/per_user.parquet")
    cell = pu[(pu.model == "bias") & (pu.seed == 0) & (pu.scenario == "user_cold") & (pu.metric == "mae")]
    cell = cell.merge(design[design.scenario == "user_cold"], on="user_id")
    pop = design[design.scenario == "user_cold"].groupby("stratum").size()
    est = stratified_mean(cell.value.to_numpy(), cell.stratum.to_numpy(), pop)["estimate"]
    seed0 = next(r for r in acc if r["model"] == "bias" and r["scenario"] == "user_cold")["values"][0]
    assert seed0 == pytest.approx(est, rel=1e-12)
    # every fairness and robustness record of a sampled scenario says what it estimates, and none is
    # left unweighted; the UGF record's advantaged side is the design-weighted mean of its users
    for name in ("fairness", "robustness"):
        recs = [r for r in json.loads((on / f"metrics/{name}.json").read_text())["records"]
                if r.get("scenario") in sampled]
        assert recs and all("sample" in r for r in recs), name
        assert not [r["kind"] for r in recs if "without design weights" in r["sample"]["estimator"]], name
    fair = json.loads((on / "metrics/fairness.json").read_text())["records"]
    assert {"ugf", "parity", "exposure", "miscalibration"} <= {r["kind"] for r in fair}
    ugf = [r for r in fair if r["kind"] == "ugf" and r["scenario"] in sampled]
    assert ugf and all(r["n_advantaged"] + r["n_disadvantaged"] <= len(sampled[r["scenario"]]) for r in ugf)
    assert all("linearised" in r["interval"] for r in ugf if not r["insufficient"])
    print({(r["scenario"], r["metric"]): (r["n_advantaged"], r["insufficient"]) for r in ugf})
    # the provenance digests the same task split either way, and the sample on its own (None when off)
    from audit.provenance import sample_digest

    prov_on, prov_off = (json.loads((p / "metrics/provenance.json").read_text()) for p in (on, off))
    assert prov_on["tasks_sha256"] == prov_off["tasks_sha256"]
    assert prov_on["sample_sha256"] == sample_digest(on / "data/tasks") and prov_off["sample_sha256"] is None
    # sampling off: no sample file, no sample fields, every evaluation user scored
    assert not (off / "data/tasks" / SAMPLE_FILE).exists()
    off_summary = json.loads((off / "metrics/summary.json").read_text())
    assert "sample" not in off_summary and not any("sample" in r for r in off_summary["records"])
    pred = pd.read_parquet(off / "predictions/bias/seed0.parquet")
    for sc, g in pred.groupby("scenario"):
        assert set(g.user_id) == set(pd.read_parquet(off / f"data/tasks/{sc}.parquet").user_id)


def test_group_comparison_with_a_design() -> None:
    """With one stratum and unit weights the design changes nothing; with unequal weights each group's
    value is its stratified mean and the permutation test is the unweighted one on the sampled users."""
    from audit.fairness import group_comparison

    rng = np.random.default_rng(5)
    uid = np.arange(200)
    values = pd.Series(rng.gamma(2.0, 0.4, 200), index=uid)
    groups = pd.Series(np.where(uid % 3 == 0, "F", "M"), index=uid)
    plain = group_comparison(values, groups, n_perm=199, min_size=10)
    flat = pd.DataFrame({"stratum": 0, "weight": 1.0}, index=uid)
    same = group_comparison(values, groups, n_perm=199, min_size=10, design=flat)
    pd.testing.assert_frame_equal(plain.table, same.table, rtol=1e-10)
    assert same.p_value == plain.p_value and same.difference == pytest.approx(plain.difference)

    stratum = (uid % 3 == 0) * 2 + (uid < 60)          # F/M crossed with a second attribute
    weight = np.where(uid < 60, 1.0, 4.0)               # the second attribute's users sampled 1 in 4
    design = pd.DataFrame({"stratum": stratum, "weight": weight}, index=uid)
    got = group_comparison(values, groups, n_perm=199, min_size=10, design=design)
    for grp in ("F", "M"):
        m = (groups == grp).to_numpy()
        pop = pd.Series(weight[m]).groupby(stratum[m]).sum()
        ref = stratified_mean(values.to_numpy()[m], stratum[m], pop)
        row = got.table.set_index("group").loc[grp]
        assert row.value == pytest.approx(ref["estimate"], rel=1e-12)
        half = ref["ci_high"] - ref["estimate"]
        assert (row.ci_low, row.ci_high) == pytest.approx((ref["estimate"] - half, ref["estimate"] + half))
    assert got.p_value == plain.p_value                   # the test relabels the same sampled users
    assert got.overall == pytest.approx(np.average(values, weights=weight))
