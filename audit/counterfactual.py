"""Counterfactual fairness test: would the model recommend differently had the user been of
another group, everything else equal?

For each sensitive attribute and each task, the user's value is replaced by one substitute for every
other group of that attribute, the model is asked again (through `predict` only) and three changes
are measured against the factual predictions, then averaged over the substitutes:

- mean_abs_delta: mean over candidates of |predicted rating (counterfactual) - (factual)|;
- top10_jaccard: Jaccard overlap of the top-k candidate sets (k = 10, fewer when a task has fewer
  candidates), ranked by predicted score;
- delta_ndcg: nDCG@k(counterfactual) - nDCG@k(factual), with per-candidate gains supplied by the
  caller (`gains`): `gains_from_ratings` (graded 2^r - 1 from the true query ratings, ranking
  within the query set, as in MeLU) or `gains_from_relevant` (binary, from a set of relevant items
  per user). Without gains, delta_ndcg is NaN. Tasks whose ideal DCG is 0 are left out of it.

Substitutes come from the declared schema (`substitutes`): each category of a categorical attribute,
and for a numeric one a value inside each declared bucket, because models see the bucket, not the
raw number (metarec.features): substituting a raw value from the user's own bucket would change
nothing and dilute the measure. The user's own group is compared by label, never by raw value.

Ties in a ranking are broken at random, seeded per (seed, task), with the same draw for the factual
and the counterfactual list, so ties never show up as a change and never favour low item ids.

Why the scoring is grouped by user: each new user is scored 28 times over the whole
catalogue (factual and 27 substitutes on MovieLens), the largest cost of the fairness stage. Users go in blocks of
bounded size (memory does not grow with the population), each block in one predict call holding
every user's factual task beside all its substitutes, and everything about a user that does not
depend on the substitute (candidates, tie order, gains, factual ranking) is prepared once.

Records (docs/DESIGN.md, fairness.json `counterfactual`): per scenario and attribute, one per
original group of the user and one with group "all"; `rank` orders attributes by overall
mean_abs_delta within a scenario (1 = most influential); `n` counts users; `seeds` lists the
training seeds whose models were asked (each user's changes are averaged over them first);
`substitutes` names the groups substituted. A model that ignores the attribute gives exactly 0, 1
and 0.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from audit.robustness import _is_missing, _sorted_values
from metarec.memory import bounded
from metarec.predict import join_shards, shard_of

if TYPE_CHECKING:
    from metarec.data.schema import DataSpec
    from metarec.models.base import Recommender
    from metarec.tasks import Task


def top_k(items: np.ndarray, scores: np.ndarray, k: int = 10, keys: np.ndarray | None = None) -> np.ndarray:
    """Item ids of the k best scores; ties broken by `keys` (ascending; default the item id)."""
    items = np.asarray(items)
    scores = np.asarray(scores, dtype=float)
    order = np.lexsort((items if keys is None else np.asarray(keys), -scores))
    return items[order[:k]]


def ndcg_at_k(items: np.ndarray, scores: np.ndarray, gains: np.ndarray, k: int = 10,
              keys: np.ndarray | None = None) -> float:
    """nDCG@k of the ranking by `scores` (ties by `keys`, default item id) with the given per-item gains.

    Discount 1/log2(1 + rank). NaN when the ideal DCG is 0 (no relevant item: undefined).
    """
    gains = np.asarray(gains, dtype=float)
    items = np.asarray(items)
    order = np.lexsort((items if keys is None else np.asarray(keys), -np.asarray(scores, dtype=float)))[:k]
    disc = 1.0 / np.log2(np.arange(2, len(order) + 2))
    dcg = float(np.sum(gains[order] * disc))
    ideal = np.sort(gains)[::-1][:k]
    idcg = float(np.sum(ideal * disc[: len(ideal)]))
    return dcg / idcg if idcg > 0 else float("nan")


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B|; 1 when both are empty (nothing changed)."""
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def gains_from_ratings(truth: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Graded gains 2^r - 1 from true query ratings aligned with candidates (nDCG within the query set)."""
    return [np.power(2.0, np.asarray(y, dtype=float)) - 1.0 for y in truth]


class RelevantGains(SequenceABC):
    """Binary gains per task, made when asked for: a catalogue-sized array per user held for every
    user at once would grow with users x items, so each is built from the task's candidates and the
    user's relevant set on access (the relevant sets are small)."""

    def __init__(self, tasks: Sequence["Task"], relevant: Mapping[int, set]) -> None:
        self._tasks = list(tasks)
        self._relevant = relevant

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t = self._tasks[i]
        cands = np.asarray(t.candidates)
        return np.isin(cands, np.asarray(sorted(self._relevant.get(t.user_id, ())), dtype=cands.dtype)).astype(float)


def gains_from_relevant(tasks: Sequence["Task"], relevant: Mapping[int, set]) -> RelevantGains:
    """Binary gains: 1 for candidates in the user's relevant set (e.g. held-out items rated >= 4)."""
    return RelevantGains(tasks, relevant)


# ------------------------------------------------------------------------------- what to substitute
def own_groups(spec: "DataSpec", users: pd.DataFrame, attributes: Sequence[str]) -> pd.DataFrame:
    """user_id plus each attribute's group label as the model sees it (numeric: declared bucket)."""
    out = pd.DataFrame({"user_id": users["user_id"].to_numpy()})
    for name in attributes:
        attr = spec.user_attr(name)
        col = attr.bucketize(users[name]) if attr.kind == "numeric" else users[name].astype(object)
        out[name] = [None if _is_missing(v) else str(v) for v in col]
    return out


def substitutes(spec: "DataSpec", users: pd.DataFrame, attribute: str) -> dict[str, object]:
    """Group label -> the value put in its place, for one declared user attribute.

    Numeric: for each declared bucket that has users, its users' lower median value (an observed
    value inside the bucket); buckets no user is in are left out, since no model learned them.
    Otherwise: each observed category, as itself (validation keeps them within the declared ones).
    """
    attr = spec.user_attr(attribute)
    values = users[attribute]
    present = values[[not _is_missing(v) for v in values]]
    if attr.kind != "numeric":
        return {str(v): v for v in _sorted_values(present.tolist())}
    labels = attr.bucketize(present)
    out: dict[str, object] = {}
    for label in attr.bucket_labels():
        inside = np.sort(present[(labels == label).to_numpy()].to_numpy())
        if len(inside):
            v = inside[(len(inside) - 1) // 2]
            out[label] = v.item() if isinstance(v, np.generic) else v
    return out


# ------------------------------------------------------------------------------------- the test
CHANGES = ["mean_abs_delta", "top10_jaccard", "delta_ndcg"]
# Predicted values (users x asks x candidates) one block of users may hold at once: 32 MB of float64,
# whatever the catalogue and population size (a user with a larger catalogue gets a block alone).
MAX_VALUES = 1 << 22


@dataclass(frozen=True)
class _Plan:
    """Who gets which substitute: per attribute, each task's own label (None: skipped) and the
    {label: value} substitutes, in the order they are averaged."""

    attributes: list[str]
    labels: dict[str, list[object]]
    subs: dict[str, dict[str, object]]

    def asks(self, i: int) -> list[tuple[str, str]]:
        """Task i's counterfactual asks, (attribute, substitute label), every group but its own."""
        return [(a, label) for a in self.attributes if not _is_missing(self.labels[a][i])
                for label in self.subs[a] if label != self.labels[a][i]]


def _plan(tasks: Sequence["Task"], attributes: Sequence[str],
          values: Mapping[str, Mapping[str, object] | Sequence[object]] | None, own: pd.DataFrame | None) -> _Plan:
    """The substitutes and own labels of every task (`counterfactual_changes` documents the arguments),
    settled once for the whole population so that blocks of users cannot change them."""
    oi = own.set_index("user_id") if own is not None else None
    labels: dict[str, list[object]] = {}
    subs: dict[str, dict[str, object]] = {}
    for attr in attributes:
        raw = [t.user_attrs.get(attr) for t in tasks]
        if oi is not None and attr in oi.columns:
            labels[attr] = [None if _is_missing(r) else oi[attr].get(t.user_id) for t, r in zip(tasks, raw)]
        else:
            labels[attr] = [None if _is_missing(r) else str(r) for r in raw]
        given = values.get(attr) if values is not None else None
        if given is None:
            given = _sorted_values([r for r, lab in zip(raw, labels[attr]) if not _is_missing(lab)])
        subs[attr] = dict(given) if isinstance(given, Mapping) else {str(v): v for v in _sorted_values(given)}
    return _Plan(list(attributes), labels, subs)


def _blocks(tasks: Sequence["Task"], plan: _Plan, max_values: int) -> list[range]:
    """Consecutive tasks whose factual and counterfactual predictions fit in `max_values` values."""
    out, start, held = [], 0, 0
    for i, t in enumerate(tasks):
        size = (1 + len(plan.asks(i))) * len(t.candidates)
        if i > start and held + size > max_values:
            out.append(range(start, i))
            start, held = i, 0
        held += size
    if start < len(tasks):
        out.append(range(start, len(tasks)))
    return out


def _predict(model: "Recommender", tasks: list["Task"]) -> list[np.ndarray]:
    """One predict call, its answer checked (one array per task, one value per candidate)."""
    preds = model.predict(tasks)
    if len(preds) != len(tasks):
        raise ValueError(f"predict returned {len(preds)} arrays for {len(tasks)} tasks")
    out = []
    for t, p in zip(tasks, preds):
        p = np.asarray(p, dtype=float).reshape(-1)
        if len(p) != len(t.candidates):
            raise ValueError(f"user {t.user_id}: {len(t.candidates)} candidates but {len(p)} predictions")
        out.append(p)
    return out


def _score(model: "Recommender", tasks: Sequence["Task"], block: range, plan: _Plan,
           joint: bool) -> tuple[dict[int, np.ndarray], dict[tuple[int, str, str], np.ndarray]]:
    """Factual predictions of the block's tasks and their counterfactual ones, keyed (task, attribute,
    label). One predict call holds them all, so a batching model scores each user's substitutes
    side by side (same support, same candidates). A model whose answers depend on the whole set it is
    asked (`predict_chunk = None`, `joint`) is asked as before: the factual tasks together, then each
    substitute's tasks together, so its numbers do not change."""
    asks = [(i, a, label) for i in block for a, label in plan.asks(i)]
    alt_task = lambda i, a, label: tasks[i].replace(user_attrs={**tasks[i].user_attrs, a: plan.subs[a][label]})  # noqa: E731
    if not joint:
        preds = _predict(model, [tasks[i] for i in block] + [alt_task(*ask) for ask in asks])
        return dict(zip(block, preds[: len(block)])), dict(zip(asks, preds[len(block):]))
    base = dict(zip(block, _predict(model, [tasks[i] for i in block])))
    alt: dict[tuple[int, str, str], np.ndarray] = {}
    for a in plan.attributes:
        for label in plan.subs[a]:
            group = [ask for ask in asks if ask[1] == a and ask[2] == label]
            if group:
                alt.update(zip(group, _predict(model, [alt_task(*ask) for ask in group])))
    return base, alt


def _changes(candidates: np.ndarray, base: np.ndarray, alts: np.ndarray, gain: np.ndarray | None, k: int,
             keys: np.ndarray) -> np.ndarray:
    """[R, 3] changes of R counterfactual prediction rows `alts` [R, N] against `base` [N]: the
    factual top-k and nDCG are computed once and every row's ranking in one sort (each row equal,
    bit for bit, to `top_k` and `ndcg_at_k` on it alone)."""
    n = len(candidates)
    mad = np.mean(np.abs(alts - base), axis=1) if n else np.zeros(len(alts))
    orders = np.lexsort((np.broadcast_to(keys, alts.shape), -alts), axis=-1)[:, :k]
    factual = top_k(candidates, base, k, keys)
    jac = np.array([jaccard(factual, candidates[o]) for o in orders])
    if gain is None:
        dn = np.full(len(alts), np.nan)
    else:
        gain = np.asarray(gain, dtype=float)
        disc = 1.0 / np.log2(np.arange(2, min(k, n) + 2))
        ideal = np.sort(gain)[::-1][:k]
        idcg = float(np.sum(ideal * disc[: len(ideal)]))
        if idcg > 0:
            dn = (gain[orders] * disc).sum(axis=1) / idcg - ndcg_at_k(candidates, base, gain, k, keys)
        else:
            dn = np.full(len(alts), np.nan)
    return np.column_stack([mad, jac, dn])


def counterfactual_changes(model: "Recommender", tasks: Sequence["Task"], attributes: Sequence[str], *,
                           gains: Sequence[np.ndarray] | None = None,
                           values: Mapping[str, Mapping[str, object] | Sequence[object]] | None = None,
                           own: pd.DataFrame | None = None, k: int = 10, seed: int = 0,
                           max_values: int = MAX_VALUES, shard: tuple[int, int] = (0, 1)) -> pd.DataFrame:
    """Per task and attribute: the three changes averaged over the substitutes (see the module docstring).

    - values: per attribute, {group label: substitute value} (`substitutes`), or a list of raw
      values (each its own label); default the values observed in `tasks`.
    - own: user_id plus the user's group label per attribute (`own_groups`); default the raw value
      as a string. A substitute is skipped for users already in its group.
    - seed: ties are broken by np.random.default_rng([seed, task index]).
    - max_values: users are scored in blocks holding at most this many predicted values (factual and
      counterfactual), so memory does not grow with the population; each user's candidates, tie
      order, gains and factual ranking are prepared once for all of its substitutes.
    - shard: (j, n): only the j-th of n consecutive runs of those blocks, so that n compute jobs
      can share one model's re-scoring. A block's predictions do not depend on the other blocks,
      so `merge_shards` of the n results is the unsharded frame, byte for byte (tested).
    Tasks whose value of the attribute is missing are skipped for that attribute. Columns: user_id,
    scenario, attribute, own, mean_abs_delta, top10_jaccard, delta_ndcg, substitutes.
    """
    tasks = list(tasks)
    if gains is not None and len(gains) != len(tasks):
        raise ValueError(f"{len(gains)} gain arrays for {len(tasks)} tasks")
    plan = _plan(tasks, attributes, values, own)
    joint = hasattr(model, "predict_chunk") and model.predict_chunk is None
    blocks = shard_of([range(len(tasks))] if joint else _blocks(tasks, plan, int(max_values)), shard)
    rows: dict[str, list[dict]] = {a: [] for a in plan.attributes}
    for block in bounded(blocks):
        base, alt = _score(model, tasks, block, plan, joint)
        for i in block:
            asks = plan.asks(i)
            if not asks:
                continue
            t = tasks[i]
            keys = np.random.default_rng([int(seed), i]).permutation(len(t.candidates))
            changes = _changes(t.candidates, base[i], np.stack([alt[(i, a, label)] for a, label in asks]),
                               None if gains is None else gains[i], k, keys)
            for a in plan.attributes:
                mine = changes[[j for j, (b, _) in enumerate(asks) if b == a]]
                if not len(mine):
                    continue
                ok = np.isfinite(mine)
                # sequential sums in substitute order, as one running total per change
                sums = np.add.accumulate(np.vstack([np.zeros(3), np.where(ok, mine, 0.0)]), axis=0)[-1]
                counts = ok.sum(axis=0).astype(float)
                if counts[0] == 0:
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):
                    avg = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
                rows[a].append({"user_id": t.user_id, "scenario": t.scenario, "attribute": a, "own": plan.labels[a][i],
                                **dict(zip(CHANGES, avg.tolist())), "substitutes": ",".join(plan.subs[a])})
    return pd.DataFrame([r for a in plan.attributes for r in rows[a]],
                        columns=["user_id", "scenario", "attribute", "own", *CHANGES, "substitutes"])


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float:
    """sum w x / sum w over the finite values (plain mean with unit weights); NaN when none."""
    ok = values.notna().to_numpy()
    w = weights.to_numpy(np.float64)[ok]
    return float(np.dot(w, values.to_numpy(np.float64)[ok]) / w.sum()) if ok.any() and w.sum() > 0 else float("nan")


def merge_shards(frames: Sequence[pd.DataFrame], attributes: Sequence[str]) -> pd.DataFrame:
    """The shards of one `counterfactual_changes` call (in shard order) as the unsharded frame:
    each shard lists its users attribute by attribute, so the attributes are put back in
    `attributes` order, users within one in shard (task) order."""
    if not frames:
        raise ValueError("no shards to merge")
    whole = join_shards(frames)
    rank = whole["attribute"].map({a: i for i, a in enumerate(attributes)})
    return whole.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)


def counterfactual_records(changes: pd.DataFrame, attributes: Sequence[str], *, model_name: str,
                           groups: pd.DataFrame | None = None, seeds: Sequence[int] = (0,),
                           weights: pd.DataFrame | None = None) -> list[dict]:
    """Records from `counterfactual_changes` frames of one model (a `seed` column when several).

    Each user's changes are first averaged over seeds, so users (not seed x user pairs) are the unit.
    groups: optional user_id -> label columns (e.g. strata with small groups merged) naming the
    user's group in the records; default the user's own group label. weights: scenario, user_id,
    weight (audit.sampling design weights) when the users are a stratified sample: every mean, and
    the ranking of attributes, is then design-weighted (sum w x / sum w), so it estimates the
    represented population's; `n` still counts sampled users.
    """
    keys = ["user_id", "scenario", "attribute", "own", "substitutes"]
    per_user = changes.groupby(keys, sort=False, dropna=False)[CHANGES].mean().reset_index()
    if weights is None:
        per_user["weight"] = 1.0
    else:
        per_user = per_user.merge(weights[["scenario", "user_id", "weight"]], on=["scenario", "user_id"], how="left")
        if per_user["weight"].isna().any():
            row = per_user[per_user["weight"].isna()].iloc[0]
            raise ValueError(f"user {row['user_id']} ({row['scenario']}) has counterfactual changes but no design "
                             "weight.")
    gi = groups.set_index("user_id") if groups is not None else None
    if gi is not None:
        lookup = [gi[a].get(u, o) if a in gi.columns else o
                  for u, a, o in zip(per_user["user_id"], per_user["attribute"], per_user["own"])]
        per_user["group"] = [str(g) for g in lookup]
    else:
        per_user["group"] = per_user["own"].astype(str)
    records: list[dict] = []
    for scenario, fs in per_user.groupby("scenario", sort=True):
        overall = pd.Series({a: _weighted_mean(fa["mean_abs_delta"], fa["weight"])
                             for a, fa in fs.groupby("attribute", sort=False)})
        order = sorted(overall.index, key=lambda a: (-overall[a], list(attributes).index(a)))
        rank = {a: r + 1 for r, a in enumerate(order)}
        for attr in [a for a in attributes if a in rank]:
            fa = fs[fs["attribute"] == attr]
            parts = [("all", fa)] + [(str(g), fg) for g, fg in fa.groupby("group", sort=True)]
            for grp, fg in parts:
                rec = {"kind": "counterfactual", "model": model_name, "scenario": str(scenario), "attribute": attr,
                       "group": grp}
                for c in CHANGES:
                    rec[c] = _weighted_mean(fg[c], fg["weight"])
                rec["rank"] = rank[attr]
                rec["n"] = int(len(fg))
                rec["seeds"] = [int(s) for s in seeds]
                rec["substitutes"] = str(fa["substitutes"].iloc[0])
                records.append(rec)
    return records


def counterfactual_test(model: "Recommender", tasks: Sequence["Task"], attributes: Sequence[str], *,
                        gains: Sequence[np.ndarray] | None = None,
                        values: Mapping[str, Mapping[str, object] | Sequence[object]] | None = None,
                        own: pd.DataFrame | None = None, groups: pd.DataFrame | None = None, k: int = 10,
                        seed: int = 0, model_name: str | None = None) -> list[dict]:
    """Counterfactual records of one model trained with one seed (see the module docstring).

    Why: group gaps in accuracy can come from the data; a prediction that moves when only the
    sensitive attribute changes is the model's own doing. Arguments as in `counterfactual_changes`
    and `counterfactual_records`.
    """
    name = model_name or getattr(model, "name", None) or type(model).__name__
    changes = counterfactual_changes(model, tasks, attributes, gains=gains, values=values, own=own, k=k, seed=seed)
    return counterfactual_records(changes, attributes, model_name=name, groups=groups, seeds=[seed])
