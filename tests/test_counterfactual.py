"""Counterfactual test: attribute-blind models change nothing; a gender term is found and ranked first."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pytest

from audit.counterfactual import (
    CHANGES,
    counterfactual_changes,
    counterfactual_records,
    counterfactual_test,
    gains_from_ratings,
    gains_from_relevant,
    jaccard,
    merge_shards,
    ndcg_at_k,
    own_groups,
    substitutes,
    top_k,
)
from audit.robustness import _is_missing, _sorted_values
from metarec.data.schema import AttrSpec, DataSpec
from metarec.tasks import Task

ATTRS = ("gender", "age", "occupation")


# ------------------------------------------------------- the reference: the unshared implementation
def _reference_task_changes(t: Task, base: np.ndarray, alt: np.ndarray, gain: np.ndarray | None,
                            k: int, keys: np.ndarray) -> tuple[float, float, float]:
    base = np.asarray(base, dtype=float).reshape(-1)
    alt = np.asarray(alt, dtype=float).reshape(-1)
    if len(base) != len(t.candidates) or len(alt) != len(t.candidates):
        raise ValueError(f"user {t.user_id}: {len(t.candidates)} candidates but {len(base)}/{len(alt)} predictions")
    mad = float(np.mean(np.abs(alt - base))) if len(base) else 0.0
    jac = jaccard(top_k(t.candidates, base, k, keys), top_k(t.candidates, alt, k, keys))
    if gain is None:
        dn = float("nan")
    else:
        dn = ndcg_at_k(t.candidates, alt, gain, k, keys) - ndcg_at_k(t.candidates, base, gain, k, keys)
    return mad, jac, dn


def reference_changes(model, tasks: Sequence[Task], attributes: Sequence[str], *,
                      gains: Sequence[np.ndarray] | None = None,
                      values: Mapping[str, Mapping[str, object] | Sequence[object]] | None = None,
                      own: pd.DataFrame | None = None, k: int = 10, seed: int = 0) -> pd.DataFrame:
    """`counterfactual_changes` as it was before it shared work across substitutes (one predict call
    per substitute over every user, each change computed alone): the reference it is held to."""
    tasks = list(tasks)
    if gains is not None and len(gains) != len(tasks):
        raise ValueError(f"{len(gains)} gain arrays for {len(tasks)} tasks")
    base = model.predict(tasks)
    keys = [np.random.default_rng([int(seed), i]).permutation(len(t.candidates)) for i, t in enumerate(tasks)]
    oi = own.set_index("user_id") if own is not None else None

    rows = []
    for attr in attributes:
        raw = [t.user_attrs.get(attr) for t in tasks]
        if oi is not None and attr in oi.columns:
            labels = [None if _is_missing(r) else oi[attr].get(t.user_id) for t, r in zip(tasks, raw)]
        else:
            labels = [None if _is_missing(r) else str(r) for r in raw]
        present = [i for i, lab in enumerate(labels) if not _is_missing(lab)]
        given = values.get(attr) if values is not None else None
        if given is None:
            given = _sorted_values([raw[i] for i in present])
        subs = dict(given) if isinstance(given, Mapping) else {str(v): v for v in _sorted_values(given)}
        sums = {i: np.zeros(3) for i in present}
        counts = {i: np.zeros(3) for i in present}
        for label, v in subs.items():
            idx = [i for i in present if labels[i] != label]
            if not idx:
                continue
            alt_tasks = [tasks[i].replace(user_attrs={**tasks[i].user_attrs, attr: v}) for i in idx]
            alt = model.predict(alt_tasks)
            if len(alt) != len(alt_tasks):
                raise ValueError(f"predict returned {len(alt)} arrays for {len(alt_tasks)} tasks")
            for j, i in enumerate(idx):
                ch = np.array(_reference_task_changes(tasks[i], base[i], alt[j],
                                                      None if gains is None else gains[i], k, keys[i]))
                ok = np.isfinite(ch)
                sums[i][ok] += ch[ok]
                counts[i][ok] += 1
        for i in present:
            if counts[i][0] == 0:  # no other group to try
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                avg = np.where(counts[i] > 0, sums[i] / np.maximum(counts[i], 1), np.nan)
            rows.append({"user_id": tasks[i].user_id, "scenario": tasks[i].scenario, "attribute": attr,
                         "own": labels[i], **dict(zip(CHANGES, avg.tolist())), "substitutes": ",".join(subs)})
    return pd.DataFrame(rows, columns=["user_id", "scenario", "attribute", "own", *CHANGES, "substitutes"])


def make_tasks(n_users: int = 24, seed: int = 0) -> tuple[list[Task], list[np.ndarray]]:
    r = np.random.default_rng(seed)
    tasks, truth = [], []
    for u in range(n_users):
        items = r.choice(np.arange(1, 300), size=20, replace=False).astype(np.int64)
        tasks.append(Task(user_id=u, user_attrs={"gender": "FM"[u % 2], "age": [18, 25, 35, 50][u % 4],
                                                 "occupation": ["artist", "doctor", "student"][u % 3]},
                          support_items=items[:5], support_ratings=r.integers(1, 6, 5).astype(np.float32),
                          candidates=items[5:], scenario="user_cold" if u < n_users // 2 else "warm"))
        truth.append(r.integers(1, 6, 15).astype(np.float32))
    return tasks, truth


class Blind:
    """Integer scores from item ids and support ratings; never reads user_attrs."""

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        return [(t.candidates % 5).astype(float) + float(np.sum(t.support_ratings)) for t in tasks]


class PlusOneForF(Blind):
    """The blind score plus exactly 1 for gender F (integers, so differences are exact)."""

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        return [p + (1.0 if t.user_attrs["gender"] == "F" else 0.0) for p, t in zip(super().predict(tasks), tasks)]


class AgeRanker(Blind):
    """Reorders items by age: old users prefer high item ids."""

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        return [p + (t.candidates / 1000.0 if t.user_attrs["age"] >= 35 else -t.candidates / 1000.0)
                for p, t in zip(super().predict(tasks), tasks)]


def by(records: list[dict], **kw) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in kw.items())]


def test_attribute_blind_model_changes_nothing() -> None:
    tasks, truth = make_tasks()
    recs = counterfactual_test(Blind(), tasks, ATTRS, gains=gains_from_ratings(truth), model_name="blind")
    assert recs and all(r["kind"] == "counterfactual" and r["model"] == "blind" for r in recs)
    for r in recs:
        assert r["mean_abs_delta"] == 0.0 and r["top10_jaccard"] == 1.0 and r["delta_ndcg"] == 0.0
    assert {r["scenario"] for r in recs} == {"user_cold", "warm"}
    assert {r["group"] for r in by(recs, attribute="gender")} == {"all", "F", "M"}
    assert by(recs, scenario="warm", attribute="age", group="all")[0]["n"] == 12


def test_plus_one_for_f_is_exactly_one_on_gender_and_zero_elsewhere() -> None:
    tasks, truth = make_tasks()
    recs = counterfactual_test(PlusOneForF(), tasks, ATTRS, gains=gains_from_ratings(truth))
    for scenario in ("user_cold", "warm"):
        for r in by(recs, scenario=scenario, attribute="gender"):
            assert r["mean_abs_delta"] == 1.0
            assert r["top10_jaccard"] == 1.0  # a constant shift keeps the ranking
            assert r["delta_ndcg"] == 0.0
            assert r["rank"] == 1
        for a in ("age", "occupation"):
            for r in by(recs, scenario=scenario, attribute=a):
                assert r["mean_abs_delta"] == 0.0 and r["top10_jaccard"] == 1.0 and r["rank"] > 1
        assert [r["group"] for r in by(recs, scenario=scenario, attribute="gender")] == ["all", "F", "M"]


def test_ranking_changes_show_in_jaccard_and_ndcg() -> None:
    tasks, truth = make_tasks()
    recs = counterfactual_test(AgeRanker(), tasks, ATTRS, gains=gains_from_ratings(truth))
    age = by(recs, scenario="user_cold", attribute="age", group="all")[0]
    assert age["rank"] == 1 and age["mean_abs_delta"] > 0
    assert age["top10_jaccard"] < 1.0 and np.isfinite(age["delta_ndcg"])
    # 18 and 25 switch to 35 or 50 (and back) with the same scores: averaged over 3 replacements, 2 change
    young = by(recs, scenario="user_cold", attribute="age", group="18")[0]
    assert young["n"] == 3
    # without gains, delta_ndcg is NaN but the other measures stay
    no_gain = counterfactual_test(AgeRanker(), tasks, ["age"])
    assert all(np.isnan(r["delta_ndcg"]) for r in no_gain)
    assert by(no_gain, scenario="user_cold", group="all")[0]["mean_abs_delta"] == age["mean_abs_delta"]


def test_hand_computed_average_over_replacements() -> None:
    # one user of age 18 among values 18, 25, 35, 50: replacements 25 (no change), 35 and 50 (change)
    t = Task(user_id=1, user_attrs={"age": 18}, support_items=np.array([1]), support_ratings=np.array([3.0]),
             candidates=np.arange(1, 13, dtype=np.int64), scenario="s")
    others = [t.replace(user_id=u, user_attrs={"age": a}) for u, a in ((2, 25), (3, 35), (4, 50))]

    class Sign:
        def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
            return [t.candidates * (1.0 if t.user_attrs["age"] >= 35 else -1.0) for t in tasks]

    recs = counterfactual_test(Sign(), [t, *others], ["age"], model_name="x")
    r = by(recs, group="18")[0]
    # scores move from -id to +id: |delta| = 2 id, mean over ids 1..12 = 13
    assert r["mean_abs_delta"] == pytest.approx((0 + 13 + 13) / 3)
    # top-10 of 12 ids: ascending 1..10 vs descending 12..3 -> overlap 8 / 12
    assert r["top10_jaccard"] == pytest.approx((1 + 8 / 12 + 8 / 12) / 3)


def test_explicit_values_and_group_labels() -> None:
    tasks, _ = make_tasks()
    groups = pd.DataFrame({"user_id": [t.user_id for t in tasks],
                           "age": ["young" if t.user_attrs["age"] < 35 else "old" for t in tasks]})
    recs = counterfactual_test(AgeRanker(), tasks, ["age"], values={"age": [20, 60]}, groups=groups)
    assert {r["group"] for r in recs} == {"all", "young", "old"}
    # every user crosses the 35 boundary for exactly one of the two values
    assert all(r["mean_abs_delta"] > 0 for r in recs)


def test_helpers() -> None:
    items = np.array([5, 3, 9, 1])
    np.testing.assert_array_equal(top_k(items, np.array([1.0, 2.0, 2.0, 0.5]), 3), [3, 9, 5])
    assert jaccard(np.array([1, 2]), np.array([2, 3])) == pytest.approx(1 / 3)
    assert jaccard(np.array([]), np.array([])) == 1.0
    gains = np.array([0.0, 1.0, 0.0, 1.0])
    assert ndcg_at_k(items, np.array([0.0, 3.0, 1.0, 2.0]), gains, 10) == pytest.approx(1.0)
    worst = (1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert ndcg_at_k(items, np.array([3.0, 0.0, 2.0, 1.0]), gains, 10) == pytest.approx(worst)
    assert np.isnan(ndcg_at_k(items, np.zeros(4), np.zeros(4), 10))
    t = Task(user_id=7, user_attrs={}, support_items=np.array([], np.int64), support_ratings=np.array([], np.float32),
             candidates=np.array([4, 5, 6]))
    np.testing.assert_array_equal(gains_from_relevant([t], {7: {5, 99}})[0], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(gains_from_ratings([np.array([1.0, 3.0])])[0], [1.0, 7.0])


# ------------------------------------------------------------------- substitutes from the schema
SPEC = DataSpec(user_attributes=(AttrSpec("plan", "categorical"), AttrSpec("age", "numeric", edges=(30, 45))),
                item_features=(), sensitive=("plan", "age"))
USERS = pd.DataFrame({"user_id": [1, 2, 3, 4, 5, 6], "plan": ["free", "pro", "pro", "team", None, "free"],
                      "age": [22, 29, 31, 40, 50, 27]})


class Recorder(Blind):
    """Attribute-blind, but remembers the (user_id, attributes) of every predict call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, dict]]] = []

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        self.calls.append([(t.user_id, dict(t.user_attrs)) for t in tasks])
        return super().predict(tasks)


def schema_tasks() -> list[Task]:
    return [Task(user_id=int(u.user_id), user_attrs={"plan": u.plan, "age": u.age},
                 support_items=np.array([1], np.int64), support_ratings=np.array([4.0], np.float32),
                 candidates=np.arange(10, 25, dtype=np.int64), scenario="s") for u in USERS.itertuples()]


def test_substitutes_are_the_declared_categories_and_one_value_inside_each_bucket() -> None:
    assert substitutes(SPEC, USERS, "plan") == {"free": "free", "pro": "pro", "team": "team"}
    # <30 holds 22, 27, 29 (lower median 27); 30-45 holds 31, 40 (31); >=45 holds 50
    assert substitutes(SPEC, USERS, "age") == {"<30": 27, "30-45": 31, ">=45": 50}
    spec = DataSpec(user_attributes=(AttrSpec("age", "numeric", edges=(30, 45, 60)),), item_features=(), sensitive=("age",))
    assert substitutes(spec, USERS, "age") == {"<30": 27, "30-45": 31, "45-60": 50}  # no user >= 60: left out
    own = own_groups(SPEC, USERS, ["plan", "age"])
    assert own["age"].tolist() == ["<30", "<30", "30-45", "30-45", ">=45", "<30"]
    assert own["plan"].isna().tolist() == [False] * 4 + [True, False]
    assert own["plan"].dropna().tolist() == ["free", "pro", "pro", "team", "free"]


PLAN_ASKS = [{(2, "free"), (3, "free"), (4, "free")}, {(1, "pro"), (4, "pro"), (6, "pro")},
             {(1, "team"), (2, "team"), (3, "team"), (6, "team")},
             # age: one value inside each bucket, to every user outside that bucket (by bucket, not raw value)
             {(3, 27), (4, 27), (5, 27)}, {(1, 31), (2, 31), (5, 31), (6, 31)},
             {(1, 50), (2, 50), (3, 50), (4, 50), (6, 50)}]


def _substituted(call: list[tuple[int, dict]]) -> list[tuple[int, str, object]]:
    """(user, attribute changed, its new value) of each counterfactual task of a call."""
    original = {int(u.user_id): {"plan": u.plan, "age": u.age} for u in USERS.itertuples()}
    out = []
    for u, attrs in call:
        changed = [a for a in attrs if not (attrs[a] == original[u][a] or
                                            (pd.isna(attrs[a]) and pd.isna(original[u][a])))]
        assert len(changed) <= 1
        out += [(u, changed[0], attrs[changed[0]])] if changed else []
    return out


def test_each_user_gets_exactly_the_other_groups_substitutes() -> None:
    tasks = schema_tasks()
    values = {a: substitutes(SPEC, USERS, a) for a in ("plan", "age")}
    own = own_groups(SPEC, USERS, ["plan", "age"])
    model = Recorder()
    ch = counterfactual_changes(model, tasks, ["plan", "age"], values=values, own=own)
    # one call: the factual tasks, then each user's substitutes side by side (plan's, then age's)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert [u for u, _ in call[:6]] == [1, 2, 3, 4, 5, 6] and not _substituted(call[:6])
    asked = _substituted(call[6:])
    assert len(asked) == len(call) - 6 == sum(len(s) for s in PLAN_ASKS)
    assert [u for u, _, _ in asked] == sorted(u for u, _, _ in asked)      # grouped by user
    # plan (user 5 has none: skipped): free to the users not on free, pro to those not on pro, ...
    for attr, wanted in (("plan", PLAN_ASKS[:3]), ("age", PLAN_ASKS[3:])):
        assert {(u, v) for u, a, v in asked if a == attr} == set().union(*wanted)
    assert ch[ch.attribute == "plan"]["user_id"].tolist() == [1, 2, 3, 4, 6]
    assert set(ch["substitutes"]) == {"free,pro,team", "<30,30-45,>=45"}
    assert (ch["mean_abs_delta"] == 0).all() and (ch["top10_jaccard"] == 1).all()


def test_a_joint_model_is_asked_each_substitute_together() -> None:
    """A model whose answers depend on the set it is asked (`predict_chunk = None`) gets the factual
    tasks in one call and each substitute's users in one call, in the declared order."""

    class Joint(Recorder):
        predict_chunk = None

    model = Joint()
    values = {a: substitutes(SPEC, USERS, a) for a in ("plan", "age")}
    counterfactual_changes(model, schema_tasks(), ["plan", "age"], values=values,
                           own=own_groups(SPEC, USERS, ["plan", "age"]), max_values=1)
    assert len(model.calls) == 7 and not _substituted(model.calls[0])
    assert [{(u, v) for u, _, v in _substituted(call)} for call in model.calls[1:]] == PLAN_ASKS


def test_blocks_bound_what_one_call_holds() -> None:
    """With room for one user's predictions at a time, every call holds one user's factual task and
    all of its substitutes, and the changes are the same as in one block."""
    values = {a: substitutes(SPEC, USERS, a) for a in ("plan", "age")}
    own = own_groups(SPEC, USERS, ["plan", "age"])
    whole = counterfactual_changes(AgeRankerSchema(), schema_tasks(), ["plan", "age"], values=values, own=own)
    model = AgeRankerSchema()
    small = counterfactual_changes(model, schema_tasks(), ["plan", "age"], values=values, own=own, max_values=1)
    assert len(model.calls) == 6 and all(len({u for u, _ in call}) == 1 for call in model.calls)
    assert [len(call) for call in model.calls] == [1 + sum(u == uid for s in PLAN_ASKS for u, _ in s)
                                                  for uid in range(1, 7)]
    pd.testing.assert_frame_equal(small, whole)


class AgeRankerSchema(Recorder):
    """Recorder whose scores move with the age bucket, so blocks have something to change."""

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        base = super().predict(tasks)
        return [p + (t.candidates / 7.0 if t.user_attrs["age"] >= 30 else -t.candidates / 3.0)
                for p, t in zip(base, tasks)]


def test_a_bucketed_model_moves_under_every_age_substitute() -> None:
    """The model sees only the bucket: every substitute crosses a bucket, so every change is non-zero."""

    class ByBucket(Blind):
        def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
            bucket = SPEC.user_attr("age").bucketize(pd.Series([t.user_attrs["age"] for t in tasks]))
            return [p + {"<30": 0.0, "30-45": 1.0, ">=45": 2.0}[b] for p, b in zip(super().predict(tasks), bucket)]

    values = {"age": substitutes(SPEC, USERS, "age")}
    own = own_groups(SPEC, USERS, ["age"])
    ch = counterfactual_changes(ByBucket(), schema_tasks(), ["age"], values=values, own=own)
    # user 1 (<30): substitutes 31 (+1) and 50 (+2) -> 1.5; user 5 (>=45): 27 (-2), 31 (-1) -> 1.5;
    # user 3 (30-45): 27 (-1), 50 (+1) -> 1.0
    assert ch.set_index("user_id")["mean_abs_delta"].to_dict() == {1: 1.5, 2: 1.5, 3: 1.0, 4: 1.0, 5: 1.5, 6: 1.5}


def test_records_average_users_over_seeds_and_say_which() -> None:
    tasks, truth = make_tasks()
    frames = [counterfactual_changes(PlusOneForF(), tasks, ["gender"], seed=s).assign(seed=s) for s in (0, 1, 2)]
    recs = counterfactual_records(pd.concat(frames), ["gender"], model_name="m", seeds=[0, 1, 2])
    r = by(recs, scenario="warm", group="all")[0]
    assert r["seeds"] == [0, 1, 2] and r["n"] == 12 and r["mean_abs_delta"] == 1.0
    assert r["substitutes"] == "F,M"


def test_ties_are_broken_at_random_but_identically_for_both_lists() -> None:
    """A constant model: every list is a tie. Seeded keys differ by seed, yet nothing 'changes'."""

    class Constant:
        def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
            return [np.full(len(t.candidates), 3.0) for t in tasks]

    tasks, truth = make_tasks()
    recs = counterfactual_test(Constant(), tasks, ATTRS, gains=gains_from_ratings(truth), k=5, seed=3)
    assert all(r["top10_jaccard"] == 1.0 and r["delta_ndcg"] == 0.0 for r in recs)
    items = np.arange(100, 120)
    lists = {tuple(top_k(items, np.zeros(20), 5, np.random.default_rng([s, 0]).permutation(20))) for s in range(20)}
    assert len(lists) > 1  # not always the lowest ids
    np.testing.assert_array_equal(top_k(items, np.zeros(20), 3, np.arange(20)[::-1]), [119, 118, 117])


def test_counterfactual_seeds_must_be_trained_seeds() -> None:
    from metarec.errors import ConfigError
    from pipelines.fairness import _counterfactual

    params = {"seeds": [0, 1], "fairness": {"counterfactual_seeds": [0, 7]}}
    with pytest.raises(ConfigError, match=r"^params\.yaml: fairness\.counterfactual_seeds names seed 7, which is "
                                          r"not trained; expected some of \[0, 1\]$"):
        _counterfactual(params, None, None, 4.0)


# ------------------------------------------------------------ shared scoring against the reference
class Wobbly:
    """Continuous scores from item ids and every attribute (a different float per user and value),
    rounded to 0.05 so that ties happen, NaN for one user (whose changes are then not finite)."""

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        out = []
        for t in tasks:
            a = t.user_attrs
            h = (len(str(a["occupation"])) * 0.37 + float(a["age"]) * 0.011 + (a["gender"] == "F") * 0.29)
            p = np.round((np.sin(t.candidates * h) + np.cos(t.candidates * 0.1 + h)) * 20) / 20 + 3
            out.append(np.full(len(p), np.nan) if t.user_id == 5 else p)
        return out


def edge_tasks() -> tuple[list[Task], list[np.ndarray]]:
    """make_tasks plus a user with fewer candidates than k, one with none and one with no relevant item."""
    tasks, truth = make_tasks(30, seed=4)
    tasks[3] = tasks[3].replace(candidates=tasks[3].candidates[:4])
    truth[3] = truth[3][:4]
    tasks[7] = tasks[7].replace(candidates=tasks[7].candidates[:0])
    truth[7] = truth[7][:0]
    truth[9] = np.ones_like(truth[9])                     # nothing rated 4 or more: ideal DCG 0
    return tasks, truth


@pytest.mark.parametrize("max_values", [1, 200, 10 ** 9])
@pytest.mark.parametrize("joint", [False, True])
def test_shared_scoring_gives_the_reference_numbers_bit_for_bit(max_values: int, joint: bool) -> None:
    tasks, truth = edge_tasks()
    relevant = {t.user_id: set(t.candidates[y >= 4].tolist()) for t, y in zip(tasks, truth)}
    model = type("JointWobbly", (Wobbly,), {"predict_chunk": None})() if joint else Wobbly()
    for gains in (gains_from_relevant(tasks, relevant), gains_from_ratings(truth), None):
        for values in (None, {"age": [18, 35, 60], "gender": ["F", "M"]}):
            want = reference_changes(model, tasks, ATTRS, gains=gains, values=values, k=5, seed=2)
            got = counterfactual_changes(model, tasks, ATTRS, gains=gains, values=values, k=5, seed=2,
                                         max_values=max_values)
            pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert got["user_id"].tolist().count(5) == 0            # NaN predictions: no finite change, no row
    assert np.isnan(got[got.user_id == 9]["delta_ndcg"]).all()
    assert (got[got.user_id == 7]["top10_jaccard"] == 1.0).all()


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("joint", [False, True])
def test_shards_merge_into_the_unsharded_frame_byte_for_byte(n_shards: int, joint: bool) -> None:
    """Any number of shards (more than blocks too: some are then empty) gives back the same frame."""
    tasks, truth = edge_tasks()
    relevant = {t.user_id: set(t.candidates[y >= 4].tolist()) for t, y in zip(tasks, truth)}
    model = type("JointWobbly", (Wobbly,), {"predict_chunk": None})() if joint else Wobbly()
    kw = dict(gains=gains_from_relevant(tasks, relevant), k=5, seed=2, max_values=200)
    whole = counterfactual_changes(model, tasks, ATTRS, **kw)
    parts = [counterfactual_changes(model, tasks, ATTRS, shard=(j, n_shards), **kw) for j in range(n_shards)]
    assert sum(len(p) for p in parts) == len(whole)
    if n_shards > 1 and not joint:
        assert sum(len(p) > 0 for p in parts) > 1              # the work really is split
    pd.testing.assert_frame_equal(merge_shards(parts, ATTRS), whole, check_exact=True)
    with pytest.raises(ValueError, match="shard 3 of 3 does not exist"):
        counterfactual_changes(model, tasks, ATTRS, shard=(3, 3), **kw)


def test_relevant_gains_are_built_on_access() -> None:
    tasks, truth = make_tasks(5)
    relevant = {t.user_id: set(t.candidates[y >= 4].tolist()) for t, y in zip(tasks, truth)}
    gains = gains_from_relevant(tasks, relevant)
    assert len(gains) == 5 and not isinstance(gains, list)
    for g, t, y in zip(gains, tasks, truth):
        np.testing.assert_array_equal(g, (y >= 4).astype(float))
    np.testing.assert_array_equal(gains[1:3][1], gains[2])


def test_a_wrong_number_of_predictions_is_named() -> None:
    class Short(Blind):
        def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
            return [p[:-1] for p in super().predict(tasks)]

    tasks, _ = make_tasks(4)
    with pytest.raises(ValueError, match=r"^user 0: 15 candidates but 14 predictions$"):
        counterfactual_changes(Short(), tasks, ["gender"])
