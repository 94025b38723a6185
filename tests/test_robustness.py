"""Perturbation invariants and the robustness runner on a tiny deterministic model."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from audit.robustness import (
    demographic_shift,
    most_damaging,
    most_damaging_by,
    perturb_attribute_noise,
    perturb_rating_noise,
    perturb_support_size,
    prediction_frame,
    robustness_curve,
    round_half_up,
    shift_weights,
)
from metarec.models.base import Recommender
from metarec.tasks import Task

GENDERS = ("F", "M")
OCCUPATIONS = ("artist", "doctor", "student")


def make_tasks(n_users: int = 30, seed: int = 0, scenarios: Sequence[str] = ("user_cold",)) -> tuple[list[Task], list[np.ndarray]]:
    """Random tasks with support sizes 2..24 and 5 candidates, plus query truth."""
    r = np.random.default_rng(seed)
    tasks, truth = [], []
    for scenario in scenarios:
        for u in range(n_users):
            n = int(r.integers(2, 25))
            items = r.choice(np.arange(1000, 1200), size=n + 5, replace=False).astype(np.int64)
            ratings = r.integers(1, 6, size=n).astype(np.float32)
            tasks.append(Task(user_id=u, user_attrs={"gender": GENDERS[u % 2], "age": int(18 + (u * 7) % 40),
                                                     "occupation": OCCUPATIONS[u % 3]},
                              support_items=items[:n], support_ratings=ratings, candidates=items[n:],
                              scenario=scenario))
            truth.append(r.integers(1, 6, size=5).astype(np.float32))
    return tasks, truth


class SupportMean:
    """Predicts the mean support rating (3 when the support is empty) for every candidate."""

    name = "support_mean"

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        return [np.full(len(t.candidates), float(np.mean(t.support_ratings)) if len(t.support_ratings) else 3.0)
                for t in tasks]


class GenderAware(SupportMean):
    """Support mean plus 0.5 for gender F: sensitive to attribute noise."""

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        base = super().predict(tasks)
        return [b + (0.5 if t.user_attrs["gender"] == "F" else 0.0) for b, t in zip(base, tasks)]


def mae_eval(pred: pd.DataFrame) -> pd.DataFrame:
    err = (pred["y_true"] - pred["y_pred"]).abs()
    mae = err.groupby(pred["user_id"]).mean()
    hit = (err <= 1.0).groupby(pred["user_id"]).mean()
    return pd.concat([pd.DataFrame({"user_id": mae.index, "metric": "mae", "value": mae.to_numpy()}),
                      pd.DataFrame({"user_id": hit.index, "metric": "accuracy", "value": hit.to_numpy()})],
                     ignore_index=True)


def groups_of(tasks: Sequence[Task]) -> pd.DataFrame:
    seen = {t.user_id: t.user_attrs for t in tasks}
    return pd.DataFrame({"user_id": list(seen), "gender": [a["gender"] for a in seen.values()],
                         "occupation": [a["occupation"] for a in seen.values()]})


def assert_same_tasks(a: Sequence[Task], b: Sequence[Task]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.user_id == y.user_id and x.scenario == y.scenario and dict(x.user_attrs) == dict(y.user_attrs)
        np.testing.assert_array_equal(x.support_items, y.support_items)
        np.testing.assert_array_equal(x.support_ratings, y.support_ratings)
        np.testing.assert_array_equal(x.candidates, y.candidates)


# ------------------------------------------------------------------------------------ level 0
def test_no_change_levels_return_the_input() -> None:
    tasks, _ = make_tasks()
    rng = np.random.default_rng(1)
    for out in (perturb_support_size(tasks, None, rng), perturb_rating_noise(tasks, 0.0, rng),
                perturb_attribute_noise(tasks, 0.0, rng, attribute="gender")):
        assert all(x is y for x, y in zip(out, tasks))
        assert_same_tasks(out, tasks)
    assert all(x is y for x, y in zip(perturb_support_size(tasks, 10_000, rng), tasks))


# ------------------------------------------------------------------------------- support size
@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 30), seed=st.integers(0, 2**32 - 1))
def test_support_size_keeps_min_k_n_of_the_original(k: int, seed: int) -> None:
    tasks, _ = make_tasks(n_users=8)
    out = perturb_support_size(tasks, k, np.random.default_rng(seed))
    for t, o in zip(tasks, out):
        n = len(t.support_items)
        assert len(o.support_items) == len(o.support_ratings) == min(k, n)
        # a subset, with each item keeping its own rating and the original order
        pos = [int(np.flatnonzero(t.support_items == i)[0]) for i in o.support_items]
        assert pos == sorted(pos) and len(set(pos)) == len(pos)
        np.testing.assert_array_equal(o.support_ratings, t.support_ratings[pos])
        np.testing.assert_array_equal(o.candidates, t.candidates)
        assert o.user_attrs == t.user_attrs


def test_support_size_is_seeded_and_does_not_mutate() -> None:
    tasks, _ = make_tasks()
    before = [t.support_items.copy() for t in tasks]
    a = perturb_support_size(tasks, 3, np.random.default_rng(5))
    b = perturb_support_size(tasks, 3, np.random.default_rng(5))
    assert_same_tasks(a, b)
    for t, s in zip(tasks, before):
        np.testing.assert_array_equal(t.support_items, s)
    with pytest.raises(ValueError):
        perturb_support_size(tasks, -1, np.random.default_rng(0))


# -------------------------------------------------------------------------------- rating noise
@pytest.mark.parametrize("p", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_rating_noise_redraws_exactly_round_p_n_ratings(p: float) -> None:
    # with every original rating at 2.5 an integer redraw always differs, so changes count redraws exactly
    tasks, _ = make_tasks(n_users=40)
    tasks = [t.replace(support_ratings=np.full(len(t.support_ratings), 2.5, np.float32)) for t in tasks]
    total = sum(len(t.support_ratings) for t in tasks)
    out = perturb_rating_noise(tasks, p, np.random.default_rng(3), rating_min=1, rating_max=5)
    changed = sum(int(np.sum(o.support_ratings != t.support_ratings)) for t, o in zip(tasks, out))
    assert changed == round_half_up(p * total)
    for t, o in zip(tasks, out):
        np.testing.assert_array_equal(o.support_items, t.support_items)
        new = o.support_ratings[o.support_ratings != t.support_ratings]
        assert np.all(np.isin(new, [1, 2, 3, 4, 5]))
        assert o.support_ratings.dtype == t.support_ratings.dtype


def test_rating_noise_draws_uniformly_from_the_scale() -> None:
    tasks, _ = make_tasks(n_users=200)
    tasks = [t.replace(support_ratings=np.full(len(t.support_ratings), 0.5, np.float32)) for t in tasks]
    out = perturb_rating_noise(tasks, 1.0, np.random.default_rng(0), rating_min=0, rating_max=9)
    vals = np.concatenate([o.support_ratings for o in out])
    counts = np.bincount(vals.astype(int), minlength=10)
    assert set(np.unique(vals)) == set(range(10))
    assert counts.min() > 0.8 * counts.mean()


def test_round_half_up() -> None:
    assert [round_half_up(x) for x in (0.4, 0.5, 1.5, 2.5, 2.49)] == [0, 1, 2, 3, 2]


# ----------------------------------------------------------------------------- attribute noise
@pytest.mark.parametrize("attribute", ["gender", "occupation", "age"])
@pytest.mark.parametrize("p", [0.1, 0.3, 1.0])
def test_attribute_noise_changes_p_of_users_and_only_that_attribute(attribute: str, p: float) -> None:
    tasks, _ = make_tasks(n_users=50, scenarios=("warm", "user_cold"))
    out = perturb_attribute_noise(tasks, p, np.random.default_rng(7), attribute=attribute)
    observed = {t.user_attrs[attribute] for t in tasks}
    new_of: dict[int, object] = {}
    for t, o in zip(tasks, out):
        for a in t.user_attrs:
            if a != attribute:
                assert o.user_attrs[a] == t.user_attrs[a]
        np.testing.assert_array_equal(o.support_ratings, t.support_ratings)
        assert o.user_attrs[attribute] in observed
        if o.user_attrs[attribute] != t.user_attrs[attribute]:
            new_of.setdefault(t.user_id, o.user_attrs[attribute])
            assert new_of[t.user_id] == o.user_attrs[attribute]  # one new value per user, across scenarios
        else:
            assert t.user_id not in new_of
    assert len(new_of) == round_half_up(p * 50)
    assert tasks[0].user_attrs["gender"] == "F"  # input untouched


def test_attribute_noise_needs_two_values() -> None:
    tasks, _ = make_tasks(n_users=5)
    tasks = [t.replace(user_attrs={**t.user_attrs, "gender": "F"}) for t in tasks]
    with pytest.raises(ValueError):
        perturb_attribute_noise(tasks, 0.5, np.random.default_rng(0), attribute="gender")


# -------------------------------------------------------------------------- demographic shift
def test_demographic_shift_hand_computed() -> None:
    per_user = pd.DataFrame({"user_id": [1, 2, 3], "metric": "mae", "value": [1.0, 3.0, 4.0]})
    labels = pd.Series(["F", "F", "M"], index=[1, 2, 3])
    out = demographic_shift(per_user, labels, {"F": 0.5, "M": 0.5}).set_index("metric")
    assert out.at["mae", "value"] == pytest.approx(3.0)  # 0.5 * mean(1, 3) + 0.5 * 4
    assert out.at["mae", "n"] == 3
    out = demographic_shift(per_user, labels, {"F": 1, "M": 3}).set_index("metric")  # normalised shares
    assert out.at["mae", "value"] == pytest.approx(0.25 * 2 + 0.75 * 4)
    w = shift_weights(labels, {"F": 0.5, "M": 0.5})
    np.testing.assert_allclose(w.to_numpy(), [0.75, 0.75, 1.5])
    with pytest.raises(ValueError):
        shift_weights(labels, {"F": 0.5, "X": 0.5})


def test_demographic_shift_observed_mix_is_the_plain_mean() -> None:
    r = np.random.default_rng(0)
    per_user = pd.DataFrame({"user_id": np.arange(101), "metric": "mae", "value": r.random(101)})
    labels = pd.Series(r.choice(["F", "M", "X"], size=101, p=[0.2, 0.5, 0.3]), index=np.arange(101))
    observed = labels.value_counts(normalize=True).to_dict()
    plain = float(per_user["value"].mean())
    assert demographic_shift(per_user, labels, None)["value"].iloc[0] == plain
    assert demographic_shift(per_user, labels, observed)["value"].iloc[0] == pytest.approx(plain, rel=1e-12)


# ------------------------------------------------------------------------------------- runner
def direct_eval(model: Recommender, tasks: Sequence[Task], truth: Sequence[np.ndarray]) -> pd.DataFrame:
    pred = prediction_frame(tasks, truth, model.predict(tasks))
    return mae_eval(pred)


def test_runner_level_zero_equals_direct_evaluation() -> None:
    tasks, truth = make_tasks(n_users=30, scenarios=("warm", "user_cold"))
    model = SupportMean()
    groups = groups_of(tasks)
    recs = robustness_curve(model, tasks, truth, "support_size", [None, 1, 3, 5, 10, 20], evaluate=mae_eval,
                            groups=groups, seed=0)
    assert all(r["kind"] == "curve" and r["model"] == "support_mean" for r in recs)
    for scenario in ("warm", "user_cold"):
        sel = [i for i, t in enumerate(tasks) if t.scenario == scenario]
        direct = direct_eval(model, [tasks[i] for i in sel], [truth[i] for i in sel])
        for metric in ("mae", "accuracy"):
            d = direct[direct["metric"] == metric]
            r0 = [r for r in recs if r["level"] == "none" and r["scenario"] == scenario and r["metric"] == metric]
            overall = next(r for r in r0 if r["attribute"] == "all")
            assert overall["value"] == float(d["value"].mean()) and overall["delta"] == 0.0
            assert overall["n"] == 30
            for g, gg in groups.groupby("gender"):
                rec = next(r for r in r0 if r["attribute"] == "gender" and r["group"] == g)
                assert rec["value"] == float(d[d["user_id"].isin(gg["user_id"])]["value"].mean())
                assert rec["n"] == len(gg)
            assert {r["group"] for r in r0 if r["attribute"] == "occupation"} == set(OCCUPATIONS)
    # perturbed levels are recomputed, and their delta is against the unperturbed value
    lv1 = next(r for r in recs if r["level"] == 1 and r["scenario"] == "warm" and r["metric"] == "mae"
               and r["attribute"] == "all")
    base = next(r for r in recs if r["level"] == "none" and r["scenario"] == "warm" and r["metric"] == "mae"
                and r["attribute"] == "all")
    assert lv1["delta"] == pytest.approx(lv1["value"] - base["value"])
    assert lv1["value"] != base["value"]
    # a support larger than every task's is the unperturbed run again
    lv_big = [r for r in robustness_curve(model, tasks, truth, "support_size", [100], evaluate=mae_eval, seed=0)]
    assert all(r["delta"] == 0.0 for r in lv_big)


def test_runner_is_deterministic_and_noise_level_zero_is_exact() -> None:
    tasks, truth = make_tasks(n_users=20)
    model = GenderAware()
    kw = dict(evaluate=mae_eval, groups=groups_of(tasks), seed=11)
    a = robustness_curve(model, tasks, truth, "rating_noise", [0.0, 0.1, 0.5], **kw)
    b = robustness_curve(model, tasks, truth, "rating_noise", [0.0, 0.1, 0.5], **kw)
    assert a == b
    assert all(r["delta"] == 0.0 for r in a if r["level"] == 0.0)
    c = robustness_curve(model, tasks, truth, "attribute_noise:gender", [0, 0.5, 1.0], **kw)
    assert all(r["perturbation"] == "attribute_noise:gender" for r in c)
    assert all(r["delta"] == 0.0 for r in c if r["level"] == 0)
    full = [r for r in c if r["level"] == 1.0 and r["attribute"] == "all" and r["metric"] == "mae"]
    assert full and full[0]["delta"] != 0.0  # every user's gender flipped: the +0.5 moved
    # support-mean ignores attributes: attribute noise cannot change it at any level
    d = robustness_curve(SupportMean(), tasks, truth, "attribute_noise", [0.5, 1.0], attribute="occupation", **kw)
    assert all(r["delta"] == 0.0 for r in d)


def test_runner_demographic_shift_levels() -> None:
    tasks, truth = make_tasks(n_users=30)
    groups = groups_of(tasks)
    recs = robustness_curve(SupportMean(), tasks, truth, "demographic_shift",
                            [None, {"F": 0.5, "M": 0.5}, {"F": 0.9, "M": 0.1}], evaluate=mae_eval, groups=groups,
                            attribute="gender")
    per_user = direct_eval(SupportMean(), tasks, truth)
    labels = groups.set_index("user_id")["gender"]
    for level, mix in (("F=0.5,M=0.5", {"F": 0.5, "M": 0.5}), ("F=0.9,M=0.1", {"F": 0.9, "M": 0.1})):
        rec = next(r for r in recs if r["level"] == level and r["metric"] == "mae" and r["attribute"] == "all")
        expect = demographic_shift(per_user, labels, mix).set_index("metric").at["mae", "value"]
        assert rec["value"] == pytest.approx(expect)
        # per gender group the re-weighting is constant, so group values do not move
        assert all(r["delta"] == pytest.approx(0.0) for r in recs if r["level"] == level and r["attribute"] == "gender")


def test_runner_rejects_bad_input() -> None:
    tasks, truth = make_tasks(n_users=3)
    with pytest.raises(ValueError):
        robustness_curve(SupportMean(), tasks, truth, "flip", [1], evaluate=mae_eval)
    with pytest.raises(ValueError):
        robustness_curve(SupportMean(), tasks, truth[:-1], "support_size", [1], evaluate=mae_eval)


def test_most_damaging_picks_the_worst_relative_change() -> None:
    base = dict(kind="curve", perturbation="support_size", model="m", scenario="user_cold", attribute="all",
                group="all", n=10)
    recs = [
        {**base, "metric": "mae", "level": 5, "value": 0.9, "delta": 0.1},      # +12.5 %
        {**base, "metric": "mae", "level": 1, "value": 1.2, "delta": 0.4},      # +50 %
        {**base, "metric": "ndcg@10", "level": 1, "value": 0.3, "delta": -0.5},  # -62.5 %: worst
        {**base, "metric": "ndcg@10", "level": 3, "value": 0.9, "delta": 0.1},
        {**base, "metric": "mae", "level": 1, "value": 9.0, "delta": 8.0, "attribute": "gender", "group": "F"},
        {**base, "metric": "mystery", "level": 1, "value": 9.0, "delta": 8.0},
    ]
    m = most_damaging(recs)
    assert m["kind"] == "most_damaging" and m["metric"] == "ndcg@10" and m["level"] == 1 and m["delta"] == -0.5
    assert m["relative_delta"] == pytest.approx(-0.625)
    assert most_damaging(recs[:2])["level"] == 1
    assert most_damaging([]) is None
    by = most_damaging_by(recs + [{**recs[0], "scenario": "warm"}])
    assert [(r["scenario"], r["metric"]) for r in by] == [("user_cold", "ndcg@10"), ("warm", "mae")]


def test_most_damaging_on_a_real_curve() -> None:
    tasks, truth = make_tasks(n_users=30)
    recs = robustness_curve(GenderAware(), tasks, truth, "rating_noise", [0.0, 0.2, 1.0], evaluate=mae_eval, seed=1)
    m = most_damaging(recs)
    assert m is not None and m["perturbation"] == "rating_noise" and m["level"] in (0.2, 1.0)


def test_stage_skips_a_scenario_without_users_and_says_why(tmp_path, monkeypatch, capsys) -> None:
    """An empty split (e.g. no item released after new_item_year) is skipped with its reason, not a crash."""
    from metarec.data.schema import MOVIELENS_SPEC, RatingData
    from metarec.tasks import TASK_COLUMNS
    from pipelines import robustness as stage

    (tmp_path / "data" / "tasks").mkdir(parents=True)
    frame = pd.DataFrame({"task_id": [0, 0], "scenario": "user_cold", "user_id": [1, 1], "item_id": [5, 6],
                          "rating": [4.0, 3.0], "timestamp": [1, 2], "role": ["support", "query"]})
    frame[list(TASK_COLUMNS)].to_parquet(tmp_path / "data" / "tasks" / "user_cold.parquet")
    frame[list(TASK_COLUMNS)].iloc[:0].to_parquet(tmp_path / "data" / "tasks" / "item_cold.parquet")
    monkeypatch.chdir(tmp_path)
    data = RatingData(ratings=frame[["user_id", "item_id", "rating", "timestamp"]],
                      users=pd.DataFrame({"user_id": [1], "gender": ["F"], "age": [30], "occupation": ["x"]}),
                      items=pd.DataFrame({"item_id": [5, 6], "genres": ["A", "B"]}), spec=MOVIELENS_SPEC)
    keep, skipped = stage._scenarios({"robustness": {"scenarios": ["item_cold", "user_cold"]}}, data)
    assert keep == ["user_cold"]
    reason = "data/tasks/item_cold.parquet holds no tasks: no user of this scenario met the split's conditions"
    assert skipped == [{"kind": "skipped", "scenario": "item_cold", "reason": reason}]
    assert f"robustness: scenario item_cold skipped ({reason})" in capsys.readouterr().out
