"""Running a model over a split: query predictions and top-k lists over the catalogue.

Catalogue candidates for a task are the items of its scenario's item partition (existing items for
warm and user_cold, new items for item_cold and user_item_cold) that are not in its support set;
liked query items are then the relevant ones. Scoring the whole catalogue rather than the 10 query
items is what keeps @10 ranking metrics from being trivially perfect.

Catalogue scoring streams: candidates are built for a chunk of tasks at a time and only each
task's top-k is kept, so memory grows with the chunk (at most CATALOGUE_CHUNK_TASKS tasks and
CATALOGUE_CHUNK_PAIRS task-candidate pairs, at least one task), not with users x items; the heap
holes that chunks of changing sizes leave behind are handed back as they pile up
(`metarec.memory.bounded`). A task with k or fewer candidates cannot be ranked honestly (every
candidate would be listed): it is left out of the lists and counted (`catalogue_exclusions`), not
an error.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from metarec.memory import bounded
from metarec.models.base import Recommender
from metarec.tasks import Task, TaskSet

NEW_ITEM_SCENARIOS = ("item_cold", "user_item_cold")
CATALOGUE_CHUNK_TASKS = 64        # tasks per predict call (a model's own predict_chunk wins)
CATALOGUE_CHUNK_PAIRS = 1 << 20   # (task, candidate) pairs per predict call, above one task
RANKING_COLUMNS = ("user_id", "scenario", "rank", "item_id", "score", "n_candidates")


def _checked(tasks: Sequence[Task], preds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Predictions as float64 arrays, refused unless each has one value per candidate of its task."""
    out = [np.asarray(p, dtype=np.float64) for p in preds]
    if len(out) != len(tasks):
        raise ValueError(f"model returned {len(out)} prediction arrays for {len(tasks)} tasks")
    for t, p in zip(tasks, out):
        if p.shape != (len(t.candidates),):
            raise ValueError(f"model returned {p.shape} predictions for user {t.user_id}; expected {len(t.candidates)}")
    return out


def predict_in_chunks(model: Recommender, tasks: Sequence[Task], chunk: int = 256) -> list[np.ndarray]:
    """Predict in blocks to bound memory. A model whose predictions depend on the whole set of
    tasks asked together (classic models fold every support set into one fit) sets
    `predict_chunk = None` and gets all tasks in one call, so chunking never changes its answers."""
    if hasattr(model, "predict_chunk"):
        chunk = model.predict_chunk or max(len(tasks), 1)
    out: list[np.ndarray] = []
    for start in bounded(range(0, len(tasks), chunk)):
        part = list(tasks[start: start + chunk])
        out.extend(_checked(part, model.predict(part)))
    return out


def query_predictions(model: Recommender, split: TaskSet) -> pd.DataFrame:
    """One row per query (user, item): user_id, item_id, scenario, y_true, y_pred (CONTRACTS.md)."""
    pairs = split.tasks_with_truth()
    tasks = [t for t, _ in pairs]
    preds = predict_in_chunks(model, tasks)
    sizes = [len(t.candidates) for t in tasks]
    return pd.DataFrame({
        "user_id": np.repeat(np.array([t.user_id for t in tasks], dtype=np.int64), sizes),
        "item_id": np.concatenate([t.candidates for t in tasks]) if tasks else np.zeros(0, np.int64),
        "scenario": np.repeat(np.array([t.scenario for t in tasks], dtype=object), sizes),
        "y_true": np.concatenate([y for _, y in pairs]).astype(np.float64) if tasks else np.zeros(0),
        "y_pred": np.concatenate(preds) if tasks else np.zeros(0)})


def catalogue_pools(items: pd.DataFrame, new_items: set[int]) -> dict[bool, np.ndarray]:
    """The sorted item ids of each partition: {False: existing items, True: new items}."""
    all_items = np.sort(items["item_id"].to_numpy(np.int64))
    is_new = np.isin(all_items, np.fromiter(new_items, dtype=np.int64, count=len(new_items)))
    return {False: all_items[~is_new], True: all_items[is_new]}


def _with_catalogue(task: Task, pools: Mapping[bool, np.ndarray]) -> Task:
    pool = pools[task.scenario in NEW_ITEM_SCENARIOS]
    return task.replace(candidates=np.setdiff1d(pool, task.support_items, assume_unique=True))


def catalogue_tasks(split: TaskSet, new_items: set[int]) -> list[Task]:
    """The split's tasks with every unrated item of the scenario's item partition as candidates
    (all at once: users x items memory; catalogue_rankings streams instead)."""
    pools = catalogue_pools(split.items, new_items)
    return [_with_catalogue(t, pools) for t in split.tasks()]


def candidate_counts(split: TaskSet, new_items: set[int]) -> pd.DataFrame:
    """Per task, in task_id order (the order of `split.tasks()`): task_id, user_id, scenario and
    n_candidates, the number of catalogue candidates, counted without building them: the size of
    the scenario's item partition less the distinct support items that lie in it."""
    f = split.frame
    if not len(f):
        return pd.DataFrame({"task_id": np.zeros(0, np.int64), "user_id": np.zeros(0, np.int64),
                             "scenario": np.zeros(0, object), "n_candidates": np.zeros(0, np.int64)})
    pools = catalogue_pools(split.items, new_items)
    tasks = f.groupby("task_id", sort=True).agg(user_id=("user_id", "first"), scenario=("scenario", "first"))
    on_new = tasks["scenario"].isin(NEW_ITEM_SCENARIOS).to_numpy()
    support = f.loc[f["role"] == "support", ["task_id", "item_id", "scenario"]].drop_duplicates(["task_id", "item_id"])
    item = support["item_id"].to_numpy(np.int64)
    in_pool = np.where(support["scenario"].isin(NEW_ITEM_SCENARIOS).to_numpy(),
                       pd.Series(item).isin(pools[True]).to_numpy(), pd.Series(item).isin(pools[False]).to_numpy())
    rated = pd.Series(in_pool.astype(np.int64)).groupby(support["task_id"].to_numpy()).sum()
    size = np.where(on_new, len(pools[True]), len(pools[False]))
    n = size - rated.reindex(tasks.index, fill_value=0).to_numpy(np.int64)
    return pd.DataFrame({"task_id": tasks.index.to_numpy(np.int64), "user_id": tasks["user_id"].to_numpy(np.int64),
                         "scenario": tasks["scenario"].to_numpy(object), "n_candidates": n.astype(np.int64)})


def catalogue_exclusions(split: TaskSet, new_items: set[int], k: int) -> list[dict]:
    """One record per scenario of the split: how many users catalogue metrics leave out because
    they have k or fewer candidates (they rated nearly all of the scenario's items), and why.

    These users keep their query metrics (MAE, query nDCG); only the top-k list metrics, which
    would be trivially perfect for them, are not computed.
    """
    counts = candidate_counts(split, new_items)
    out = []
    for scenario, g in counts.groupby("scenario", sort=True):
        few = g[g["n_candidates"] <= k]
        out.append({"kind": "excluded", "scenario": str(scenario), "metrics": "catalogue", "k": int(k),
                    "n_users": int(few["user_id"].nunique()), "of_users": int(g["user_id"].nunique()),
                    "reason": f"{k} or fewer unrated items of the scenario's catalogue, so every candidate would "
                              f"be in the top-{k} list and the list metrics would be trivially perfect"})
    return out


def task_scorer(model: Recommender, tasks: Sequence[Task]) -> tuple[Callable[[Sequence[Task]], list[np.ndarray]],
                                                                    int | None]:
    """(a function predicting a chunk of `tasks` with any candidates, tasks per call or None for
    all at once).

    A model whose predictions depend on every task asked together (`predict_chunk = None`) either
    offers `scorer(tasks)`, fitted once on all of them and then fed chunks (the classic models),
    or gets every task in one call (an external model's contract). Other models adapt per task
    inside `predict`, so any chunk gives the same answers.
    """
    if hasattr(model, "predict_chunk") and model.predict_chunk is None:
        if hasattr(model, "scorer"):
            return model.scorer(tasks), CATALOGUE_CHUNK_TASKS
        return model.predict, None
    return model.predict, getattr(model, "predict_chunk", None) or CATALOGUE_CHUNK_TASKS


def _chunks(sizes: np.ndarray, max_tasks: int | None, max_pairs: int) -> Iterator[np.ndarray]:
    """Consecutive index blocks of at most max_tasks tasks (None: all) and max_pairs candidates
    in all, each with at least one task."""
    start, n = 0, len(sizes)
    limit = n if max_tasks is None else max_tasks
    while start < n:
        end, pairs = start + 1, int(sizes[start])
        while end < n and end - start < limit and (max_tasks is None or pairs + int(sizes[end]) <= max_pairs):
            pairs += int(sizes[end])
            end += 1
        yield np.arange(start, end)
        start = end


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the k highest scores, best first; tied scores in a random order drawn from `rng`.

    Why random: breaking ties by item id is not neutral (on ML-100K low ids are rated higher, so a
    constant predictor's lists looked better than chance). A seeded generator keeps the lists
    reproducible. The one ranking helper for catalogue lists and the counterfactual test.
    """
    neg = -np.asarray(scores, dtype=np.float64)
    noise = rng.random(neg.size)
    if 0 < k < neg.size:
        # Only the k best can be listed, so sort those alone: every score better than the k-th,
        # and of the scores tied with it the ones with the smallest noise (the full sort's order
        # among ties), found by a partition rather than a sort. The full sort restricted to these
        # is theirs, so the list is the same; it costs O(n) instead of O(n log n), which matters
        # when a model ties most of a large catalogue (a constant predictor at 10M ratings).
        # NaN scores sort last, so keep the full sort when the k-th best is NaN.
        kth = np.partition(neg, k - 1)[k - 1]
        if not np.isnan(kth):
            tied = neg == kth
            need = k - int(np.count_nonzero(neg < kth))
            if need < np.count_nonzero(tied):
                cut = np.partition(noise[tied], need - 1)[need - 1]
                tied &= noise <= cut
            head = np.flatnonzero((neg < kth) | tied)
            return head[np.lexsort((noise[head], neg[head]))][:k]
    return np.lexsort((noise, neg))[:k]


def task_rng(seed: int, user_id: int) -> np.random.Generator:
    """The tie-breaking generator of one user's list: a function of (seed, user) only, so the lists
    do not depend on how tasks are chunked or ordered, and every model sees the same tie order."""
    return np.random.default_rng([int(seed), int(user_id)])


def top_k_lists(tasks: Sequence[Task], preds: Sequence[np.ndarray], k: int, seed: int = 0) -> pd.DataFrame:
    """Top-k per task by score (ties at random, seeded per user); records how many candidates there were."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in RANKING_COLUMNS}
    for t, p in zip(tasks, preds):
        n = len(t.candidates)
        if k >= n:
            raise ValueError(f"user {t.user_id} ({t.scenario}): k={k} is not below the {n} candidates; "
                             "every ranking metric would be trivially perfect")
        order = top_k(p, k, task_rng(seed, t.user_id))
        cols["user_id"].append(np.full(k, t.user_id, dtype=np.int64))
        cols["scenario"].append(np.full(k, t.scenario, dtype=object))
        cols["rank"].append(np.arange(1, k + 1, dtype=np.int64))
        cols["item_id"].append(t.candidates[order])
        cols["score"].append(np.asarray(p, dtype=np.float64)[order])
        cols["n_candidates"].append(np.full(k, n, dtype=np.int64))
    return pd.DataFrame({c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()})


def catalogue_rankings(model: Recommender, split: TaskSet, new_items: set[int], k: int = 10,
                       seed: int = 0, chunk_pairs: int = CATALOGUE_CHUNK_PAIRS,
                       shard: tuple[int, int] = (0, 1)) -> pd.DataFrame:
    """Top-k catalogue lists of every task with more than k candidates; `seed` fixes the random
    order of tied scores. Streams: candidates exist for one chunk of tasks at a time, and each
    chunk's scores are dropped once its lists are taken. Tasks with k or fewer candidates are left
    out (catalogue_exclusions counts them) but still take part in a classic model's fit.

    `shard` (j, n): only the j-th of n consecutive runs of those chunks, so that n compute jobs can
    share one model's scoring. Each chunk is one predict call whatever the shards, so the n results
    concatenated in shard order are the unsharded lists, byte for byte (tested)."""
    tasks = split.tasks()
    counts = candidate_counts(split, new_items)["n_candidates"].to_numpy(np.int64)
    keep = np.flatnonzero(counts > k)
    pools = catalogue_pools(split.items, new_items)
    score, per_call = task_scorer(model, tasks)
    lists = []
    for block in bounded(shard_of(list(_chunks(counts[keep], per_call, chunk_pairs)), shard)):
        chunk = [_with_catalogue(tasks[i], pools) for i in keep[block]]
        lists.append(top_k_lists(chunk, _checked(chunk, score(chunk)), k, seed))
    return pd.concat(lists, ignore_index=True) if lists else top_k_lists([], [], k, seed)


def shard_of(blocks: Sequence, shard: tuple[int, int]) -> Sequence:
    """Shard j of n of `blocks`: the j-th of n consecutive runs (empty when n exceeds the blocks).
    Consecutive runs joined in shard order give the blocks back in order, which is what lets a
    sharded result equal the unsharded one."""
    j, n = (int(x) for x in shard)
    if not 0 <= j < n:
        raise ValueError(f"shard {j} of {n} does not exist; expected 0 <= shard < {n}")
    return blocks[j * len(blocks) // n:(j + 1) * len(blocks) // n]


def join_shards(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The shards of one `catalogue_rankings` call, in shard order, as the unsharded lists (an empty
    shard, which has no column types, is left out)."""
    return pd.concat([p for p in parts if len(p)] or list(parts[:1]), ignore_index=True)
