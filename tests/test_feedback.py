"""Feedback-loop simulation and its audit: known answers on a small synthetic dataset.

The oracle arm must attain the highest utility, the random arm the lowest homogenisation,
epsilon-greedy with epsilon = 1 must be the random arm, zero rounds must reproduce the offline
evaluation, and a planted acceptance bias against one group must show as a growing gap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from audit.feedback import Run, _jaccard_sums, audit_records, collect, gap_growth
from audit.metrics import per_user_accuracy
from metarec.data.synthetic import generate
from metarec.data.validate import group_labels
from metarec.errors import ConfigError
from metarec.feedback import policies
from metarec.feedback.choice import ChoiceModel
from metarec.feedback.loop import LoopConfig, arrival_rounds, population_from, simulate
from metarec.feedback.oracle import calibrate_sigma, fit_oracle, load_oracles, save_oracles
from metarec.models import registry
from metarec.predict import query_predictions
from metarec.splits import SplitConfig, build_splits, partition
from metarec.tasks import TaskSet

ARMS = [("reference", "random"), ("reference", "popularity"), ("reference", "oracle"),
        ("bias", "greedy"), ("bias", "epsilon_greedy")]


@pytest.fixture(scope="module")
def world():
    data, _ = generate({"seed": 3, "n_users": 300, "n_items": 260, "n_ratings": 12000, "min_per_user": 20})
    cfg = SplitConfig(new_item_year=1997, min_ratings=13)
    frames = build_splits(data, cfg)
    split = TaskSet(frames["user_cold"], data.users, data.items)
    train = TaskSet(frames["train"], data.users, data.items)
    model = registry.build("bias", {}, 0).fit(train, None, None)
    new = partition(data, cfg).new_items
    items = np.sort(data.items["item_id"].to_numpy(np.int64))
    catalogue = items[~np.isin(items, list(new))]
    population = population_from(split.tasks_with_truth())
    oracle = fit_oracle("nmf", data, 0, rank=6, only_users=np.array([u.user_id for u in population]))
    counts = train.all_ratings().groupby("item_id").size()
    attr = data.spec.sensitive[0]
    groups = pd.DataFrame({"user_id": data.users["user_id"], attr: group_labels(data.users, data.spec, attr).to_numpy()})
    return dict(data=data, split=split, model=model, catalogue=catalogue, population=population, oracle=oracle,
                counts=counts, groups=groups, attr=attr,
                choice=ChoiceModel(center=float(data.ratings["rating"].mean())))


def _run(w, policy, model_name, cfg, seed, acceptance=None):
    model = w["model"] if model_name != "reference" else None
    log = simulate(policy, w["population"], w["catalogue"], w["oracle"], w["choice"], cfg, seed, model=model,
                   popularity=w["counts"].reindex(w["catalogue"]).fillna(0).to_numpy(float), acceptance=acceptance)
    return Run("nmf", seed, model_name, policy, log.shown, log.heldout, log.arrivals)


def _collect(w, runs):
    genres = w["data"].items.set_index("item_id")["genres"]
    return collect(runs, w["counts"], genres, w["catalogue"], w["groups"], 0.8)


@pytest.fixture(scope="module")
def arms(world):
    cfg = LoopConfig(rounds=3, k=5, initial_fraction=0.7, epsilon=0.2)
    runs = [_run(world, p, m, cfg, s) for s in (0, 1) for m, p in ARMS]
    return runs, *_collect(world, runs)


def _mean(frame, metric, policy, rounds=None):
    f = frame[(frame.metric == metric) & (frame.policy == policy)]
    if "attribute" in f:
        f = f[f.attribute == "all"]
    if rounds is not None:
        f = f[f["round"].isin(rounds)]
    return float(f["value"].mean())


def test_oracle_arm_attains_the_highest_expected_utility(arms):
    _, per_user, _ = arms
    utility = {p: _mean(per_user, "utility_shown", p) for _, p in ARMS}
    assert max(utility, key=utility.get) == "oracle"
    assert all(utility["oracle"] > v + 0.05 for p, v in utility.items() if p != "oracle"), utility


def test_random_arm_has_the_lowest_homogenisation(arms):
    _, _, population = arms
    last = [3]
    h = {p: _mean(population, "homogenisation", p, last) for _, p in ARMS}
    assert h["oracle"] == pytest.approx(1.0)
    assert min(h, key=h.get) == "random", h


def test_epsilon_one_equals_random(world):
    cfg = LoopConfig(rounds=2, k=5, epsilon=1.0)
    explore = _run(world, "epsilon_greedy", "bias", cfg, 4).shown
    rand = _run(world, "random", "reference", cfg, 4).shown
    cols = ["round", "user_id", "rank", "item_id", "utility", "accepted"]
    pd.testing.assert_frame_equal(explore[cols], rand[cols])
    pd.testing.assert_series_equal(explore["rating"], rand["rating"])


def test_epsilon_zero_equals_greedy(world):
    cfg = LoopConfig(rounds=1, k=5, epsilon=0.0)
    a = _run(world, "epsilon_greedy", "bias", cfg, 0).shown
    b = _run(world, "greedy", "bias", cfg, 0).shown
    pd.testing.assert_frame_equal(a, b)


def test_zero_rounds_reproduce_the_offline_numbers(world):
    cfg = LoopConfig(rounds=0, k=5)
    run = _run(world, "greedy", "bias", cfg, 0)
    offline = query_predictions(world["model"], world["split"])
    merged = offline.merge(run.heldout, on=["user_id", "item_id"], suffixes=("", "_sim"))
    assert len(merged) == len(offline) == len(run.heldout)
    np.testing.assert_allclose(merged["y_pred_sim"], merged["y_pred"], atol=1e-9)
    per_user, _ = _collect(world, [run])
    sim = per_user[per_user.metric == "mae_heldout"].set_index("user_id")["value"].sort_index()
    off = per_user_accuracy(offline)
    off = off[off.metric == "mae"].set_index("user_id")["value"].sort_index()
    np.testing.assert_allclose(sim.to_numpy(), off.reindex(sim.index).to_numpy(), atol=1e-9)


def test_planted_acceptance_bias_is_detected_as_a_growing_gap(world):
    cfg = LoopConfig(rounds=4, k=5, initial_fraction=1.0)
    labels = world["groups"].set_index("user_id")[world["attr"]]
    target = sorted(labels.dropna().unique())[0]
    suppressed = {int(u): 0.2 for u in labels.index[labels == target]}
    found = {}
    for name, acc in (("null", None), ("planted", suppressed)):
        runs = [_run(world, "greedy", "bias", cfg, s, acc) for s in (0, 1)] + \
               [_run(world, "oracle", "reference", cfg, s, acc) for s in (0, 1)]
        per_user, _ = _collect(world, runs)
        recs = gap_growth(per_user, world["groups"], 5, 4, metrics=("utility_cum",))
        found[name] = next(r for r in recs if r["policy"] == "greedy" and r["group"] == str(target))
    planted, null = found["planted"], found["null"]
    assert planted["ci_high"] < 0 and planted["p_adjusted"] < 0.01, planted
    assert planted["growth"] < null["growth"] - 1.0
    assert null["ci_low"] <= 0 <= null["ci_high"] or abs(null["growth"]) < abs(planted["growth"]) / 3


def test_gap_growth_is_welch_on_per_user_changes(arms, world):
    _, per_user, _ = arms
    recs = gap_growth(per_user, world["groups"], 5, 3, metrics=("utility_shown",))
    r = next(x for x in recs if x["policy"] == "greedy")
    f = per_user[(per_user.metric == "utility_shown") & (per_user.policy == "greedy")]
    wide = f.pivot_table(index=["seed", "user_id"], columns="round", values="value").dropna()
    change = (wide[3] - wide[0]).groupby("user_id").mean()
    lab = world["groups"].set_index("user_id")[r["attribute"]].reindex(change.index)
    a, b = change[lab == r["group"]], change[(lab != r["group"]) & lab.notna()]
    assert r["growth"] == pytest.approx(a.mean() - b.mean())
    assert r["p_value"] == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue)


def test_records_have_intervals_and_adjusted_p_values(arms, world):
    _, per_user, population = arms
    recs = audit_records(per_user, population, world["groups"], min_size=5, rounds=3, oracles=["nmf"])
    kinds = {r["kind"] for r in recs}
    assert {"curve", "gap", "gap_growth", "exploration"} <= kinds
    from audit.registry import unregistered

    assert unregistered(set(per_user.metric) | set(population.metric)) == []
    for r in recs:
        if r["kind"] in ("gap", "gap_growth"):
            assert 0 <= r["p_value"] <= r["p_adjusted"] <= 1 and r["adjustment"] == "benjamini-hochberg"
            assert r["ci_low"] <= (r["diff"] if r["kind"] == "gap" else r["growth"]) <= r["ci_high"]


def test_simulation_is_deterministic(world):
    cfg = LoopConfig(rounds=2, k=5, initial_fraction=0.5)
    a, b = (_run(world, "ucb", "bias", cfg, 7) for _ in range(2))
    pd.testing.assert_frame_equal(a.shown, b.shown)
    assert set(arrival_rounds(len(world["population"]), cfg, 7)) == {0, 1, 2}


def test_jaccard_known_answer():
    consumed = pd.DataFrame({"user_id": [1, 1, 2, 2, 2, 3], "item_id": [10, 11, 10, 11, 12, 99]})
    labels = pd.DataFrame({"g": ["a", "a", "b", None]})
    row, pairs = _jaccard_sums(consumed, np.array([1, 2, 3, 4]), labels)
    # users 1 and 2 share 2 of 3 items; 3 shares nothing; 4 consumed nothing
    assert row.tolist() == pytest.approx([2 / 3, 2 / 3, 0, 0])
    assert pairs == pytest.approx({("all", "all"): 4 / 3, ("g", "a"): 4 / 3, ("g", "b"): 0.0})


def _dense_jaccard(sets: list[set]) -> np.ndarray:
    """The users x users Jaccard matrix from Python sets (0 when both are empty)."""
    n = len(sets)
    j = np.zeros((n, n))
    for a in range(n):
        for b in range(n):
            union = len(sets[a] | sets[b])
            j[a, b] = len(sets[a] & sets[b]) / union if union else 0.0
    return j


@pytest.mark.parametrize("block", [1, 7, 2048])
def test_jaccard_sums_match_the_dense_matrix_in_any_block_size(block):
    """Row sums and within-group pair sums from blocks of sparse intersections equal those of the
    dense matrix computed from Python sets: skewed item popularity, repeated consumption, empty
    users, a missing group label."""
    rng = np.random.default_rng(3)
    users = np.arange(100, 160)
    rows = [(int(u), int(rng.zipf(1.6) % 40)) for u in users for _ in range(rng.integers(0, 6))]
    consumed = pd.DataFrame(rows + rows[:5], columns=["user_id", "item_id"])   # some items consumed twice
    labels = pd.DataFrame({"gender": rng.choice(["F", "M"], users.size),
                           "age": pd.Series(rng.choice(["18-24", "25-34", "35-44"], users.size)).where(lambda x: x != "35-44")})
    row, pairs = _jaccard_sums(consumed, users, labels, block=block)
    sets = [set(consumed.item_id[consumed.user_id == u]) for u in users]
    j = _dense_jaccard(sets)
    np.fill_diagonal(j, 0.0)
    assert row == pytest.approx(j.sum(axis=1), abs=1e-12)
    assert pairs[("all", "all")] == pytest.approx(j.sum())
    for a in labels:
        for g in labels[a].dropna().unique():
            m = (labels[a] == g).to_numpy()
            assert pairs[(a, str(g))] == pytest.approx(j[np.ix_(m, m)].sum()), (a, g)
    assert {k for k in pairs if k[0] == "age"} == {("age", "18-24"), ("age", "25-34")}


def test_noise_calibration_recovers_a_known_sigma():
    z = np.random.default_rng(1).standard_normal(50_000)
    fitted = np.full(50_000, 3.0)
    observed = np.clip(np.rint(fitted + 0.9 * z), 1, 5)
    assert calibrate_sigma(fitted, observed, 1.0, 5.0, seed=2) == pytest.approx(0.9, abs=0.03)


def test_policies_respect_the_mask():
    scores = np.array([[0.1, 5.0, -np.inf, 2.0, 3.0]])
    assert policies.greedy(scores, 2).tolist() == [[1, 4]]
    gens = [np.random.default_rng(0)]
    lists = policies.epsilon_greedy(scores, 4, 0.5, gens)
    assert sorted(lists[0].tolist()) == [0, 1, 3, 4]
    with pytest.raises(ConfigError, match="only 4 items left to show; k=5"):
        policies.greedy(scores, 5)


def test_bad_loop_parameter_is_one_sentence():
    with pytest.raises(ConfigError, match=r"^params.yaml feedback.epsilon is 1.5; expected in \[0, 1\]$"):
        LoopConfig.from_params({"epsilon": 1.5})


def test_report_section_renders_from_the_metrics_file(arms, world, tmp_path):
    import json

    from audit.feedback import headline
    from audit.feedback_report import feedback_context
    from audit.report import environment

    _, per_user, population = arms
    recs = audit_records(per_user, population, world["groups"], min_size=5, rounds=3, oracles=["nmf"])
    head = headline(recs, ["bias"], ["greedy", "epsilon_greedy"], world["attr"], "F", 3)
    cfg = {"oracles": ["nmf"], "models": ["bias"], "rounds": 3, "k": 5, "scenario": "user_cold", "seeds": [0, 1]}
    path = tmp_path / "feedback.json"
    path.write_text(json.dumps({"config": cfg, "oracles": [{"oracle": "nmf", "sigma": 1.0, "fit_rmse": 0.9}],
                                "headline": head, "records": recs}))
    ctx = feedback_context(path)
    html = environment().get_template("feedback.html.j2").render(fb=ctx)
    assert '<section id="feedback">' in html and html.count("<svg") == len(ctx["charts"]) == 5
    g = head[0]["utility_shown@round3"]
    assert f"{g[0]:.3f}" in html
    assert "simple random sample" not in html
    assert feedback_context(tmp_path / "absent.json") is None
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "population": {"n_population": 900, "n_simulated": 300, "design": "x"}}))
    html = environment().get_template("feedback.html.j2").render(fb=feedback_context(path))
    assert "user_cold users (300 of 900, a seeded simple random sample set by\nfeedback.max_users" in html


def test_max_users_draws_a_seeded_simple_random_sample_in_population_order(world):
    from dataclasses import replace

    from metarec.feedback.experiment import Experiment

    params = {"oracles": ["nmf"], "seeds": [0], "models": ["bias"], "policies": ["greedy", "oracle"], "seed": 4}
    exp = Experiment.from_params(params, [0], ["bias"])
    population = world["population"]
    assert exp.max_users is None and exp.sample_population(population) == population
    assert replace(exp, max_users=len(population)).sample_population(population) == population
    capped = Experiment.from_params({**params, "max_users": 25}, [0], ["bias"])
    picked = capped.sample_population(population)
    ids = [u.user_id for u in picked]
    assert len(picked) == 25 and ids == sorted(ids, key=[u.user_id for u in population].index)
    assert ids == [u.user_id for u in capped.sample_population(population)]               # seeded
    assert ids != [u.user_id for u in replace(capped, seed=5).sample_population(population)]
    for bad in (1, 2.5, True, "10"):
        with pytest.raises(ConfigError, match=rf"^params.yaml feedback.max_users is {bad!r}; expected null \(every "
                                              rf"user\) or an integer >= 2$"):
            Experiment.from_params({**params, "max_users": bad}, [0], ["bias"])


class _SupportMean:
    """A per-task model (no joint refit): support mean plus a fixed per-item offset."""

    def __init__(self, offsets: dict):
        self.offsets = offsets
        self.calls = 0

    def predict(self, tasks):
        self.calls += len(tasks)
        return [np.full(len(t.candidates), float(np.mean(t.support_ratings)) if len(t.support_ratings) else 3.0)
                + np.array([self.offsets.get(int(i), 0.0) for i in t.candidates]) for t in tasks]


def test_shared_prediction_cache_is_exact_and_saves_calls(world):
    cfg = LoopConfig(rounds=2, k=5)
    offsets = {int(i): 0.01 * (int(i) % 37) for i in world["catalogue"]}
    kw = dict(popularity=None)
    plain = _SupportMean(offsets)
    alone = simulate("greedy", world["population"], world["catalogue"], world["oracle"], world["choice"], cfg, 0,
                     model=plain, **kw)
    cached, cache = _SupportMean(offsets), {}
    simulate("epsilon_greedy", world["population"], world["catalogue"], world["oracle"], world["choice"], cfg, 0,
             model=cached, cache=cache, **kw)
    before = cached.calls
    shared = simulate("greedy", world["population"], world["catalogue"], world["oracle"], world["choice"], cfg, 0,
                      model=cached, cache=cache, **kw)
    pd.testing.assert_frame_equal(alone.shown, shared.shown)
    pd.testing.assert_frame_equal(alone.heldout, shared.heldout)
    assert cached.calls - before < plain.calls - len(world["population"]) // 2   # round 0 at least came from the cache


def test_oracles_travel_to_compute_jobs_as_plain_arrays(world, tmp_path):
    """The stage hands fitted oracles to its jobs as an .npz read back with allow_pickle=False:
    every field comes back equal, dtypes too, and a second family keeps its own arrays."""
    from dataclasses import fields, replace

    first = world["oracle"]
    second = replace(first, family="gbdt", utility=first.utility[:, ::-1].copy(), sigma=0.5)
    path = save_oracles(tmp_path / "oracles.npz", {"nmf": first, "gbdt": second})
    back = load_oracles(path)
    assert list(back) == ["nmf", "gbdt"]
    for want, got in ((first, back["nmf"]), (second, back["gbdt"])):
        for f in fields(want):
            a, b = getattr(want, f.name), getattr(got, f.name)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b), f.name
            else:
                assert type(a) is type(b) and a == b, f.name
    with np.load(path, allow_pickle=False) as z:      # nothing in the file needs pickle to read
        assert all(z[k].dtype != object for k in z.files)
