"""Counterfactual fairness test: would the model recommend differently had the user been of
another group, everything else equal?

For each sensitive attribute and each task, the user's value is replaced by every other observed
value of that attribute, the model is asked again (through `predict` only) and three changes are
measured against the factual predictions, then averaged over the replacement values:

- mean_abs_delta: mean over candidates of |predicted rating (counterfactual) - (factual)|;
- top10_jaccard: Jaccard overlap of the top-k candidate sets (k = 10, fewer when a task has fewer
  candidates), ranked by predicted score with ties broken by ascending item id;
- delta_ndcg: nDCG@k(counterfactual) - nDCG@k(factual), with per-candidate gains supplied by the
  caller (`gains`): `gains_from_ratings` (graded 2^r - 1 from the true query ratings, ranking
  within the query set, as in MeLU) or `gains_from_relevant` (binary, from a set of relevant items
  per user). Without gains, delta_ndcg is NaN. Tasks whose ideal DCG is 0 are left out of it.

Records (docs/DESIGN.md, fairness.json `counterfactual`): per scenario and attribute, one per
original group of the user and one with group "all"; `rank` orders attributes by overall
mean_abs_delta within a scenario (1 = most influential); `n` counts tasks. A model that ignores
the attribute gives exactly 0, 1 and 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from audit.robustness import _is_missing, _sorted_values

if TYPE_CHECKING:
    from metarec.models.base import Recommender
    from metarec.tasks import Task


def top_k(items: np.ndarray, scores: np.ndarray, k: int = 10) -> np.ndarray:
    """Item ids of the k best scores; ties broken by ascending item id (so the order is total)."""
    items = np.asarray(items)
    scores = np.asarray(scores, dtype=float)
    order = np.lexsort((items, -scores))
    return items[order[:k]]


def ndcg_at_k(items: np.ndarray, scores: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """nDCG@k of the ranking by `scores` (ties by item id) with the given per-item gains.

    Discount 1/log2(1 + rank). NaN when the ideal DCG is 0 (no relevant item: undefined).
    """
    gains = np.asarray(gains, dtype=float)
    items = np.asarray(items)
    order = np.lexsort((items, -np.asarray(scores, dtype=float)))[:k]
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


def gains_from_relevant(tasks: Sequence["Task"], relevant: Mapping[int, set]) -> list[np.ndarray]:
    """Binary gains: 1 for candidates in the user's relevant set (e.g. held-out items rated >= 4)."""
    return [np.isin(np.asarray(t.candidates), np.fromiter(relevant.get(t.user_id, ()), dtype=np.int64)).astype(float)
            for t in tasks]


def _task_changes(t: "Task", base: np.ndarray, alt: np.ndarray, gain: np.ndarray | None,
                  k: int) -> tuple[float, float, float]:
    base = np.asarray(base, dtype=float).reshape(-1)
    alt = np.asarray(alt, dtype=float).reshape(-1)
    if len(base) != len(t.candidates) or len(alt) != len(t.candidates):
        raise ValueError(f"user {t.user_id}: {len(t.candidates)} candidates but {len(base)}/{len(alt)} predictions")
    mad = float(np.mean(np.abs(alt - base))) if len(base) else 0.0
    jac = jaccard(top_k(t.candidates, base, k), top_k(t.candidates, alt, k))
    if gain is None:
        dn = float("nan")
    else:
        dn = ndcg_at_k(t.candidates, alt, gain, k) - ndcg_at_k(t.candidates, base, gain, k)
    return mad, jac, dn


def counterfactual_test(model: "Recommender", tasks: Sequence["Task"], attributes: Sequence[str], *,
                        gains: Sequence[np.ndarray] | None = None,
                        values: Mapping[str, Sequence[object]] | None = None,
                        groups: pd.DataFrame | None = None, k: int = 10,
                        model_name: str | None = None) -> list[dict]:
    """Counterfactual records for each scenario and attribute (see the module docstring).

    Why: group gaps in accuracy can come from the data; a prediction that moves when only the
    sensitive attribute changes is the model's own doing.

    - gains: per-candidate gains aligned with task.candidates (`gains_from_ratings` or
      `gains_from_relevant`), or None (delta_ndcg NaN).
    - values: replacement values per attribute (default: the values observed in `tasks`). Useful
      to bound the work for numeric attributes such as age (one predict call per value).
    - groups: optional user_id -> label columns (e.g. age buckets) naming the user's original group
      in the records; default the raw original value as a string.
    Tasks whose value of the attribute is missing are skipped for that attribute.
    """
    name = model_name or getattr(model, "name", None) or type(model).__name__
    tasks = list(tasks)
    if gains is not None and len(gains) != len(tasks):
        raise ValueError(f"{len(gains)} gain arrays for {len(tasks)} tasks")
    base = model.predict(tasks)
    gi = groups.set_index("user_id") if groups is not None else None

    rows = []  # one per (task, attribute): averages over replacement values
    for attr in attributes:
        own = [t.user_attrs.get(attr) for t in tasks]
        present = [i for i, v in enumerate(own) if not _is_missing(v)]
        candidates = list(values[attr]) if values is not None and attr in values else [own[i] for i in present]
        distinct = _sorted_values(candidates)
        sums = {i: np.zeros(3) for i in present}
        counts = {i: np.zeros(3) for i in present}
        for v in distinct:
            idx = [i for i in present if not own[i] == v]
            if not idx:
                continue
            alt_tasks = [tasks[i].replace(user_attrs={**tasks[i].user_attrs, attr: v}) for i in idx]
            alt = model.predict(alt_tasks)
            if len(alt) != len(alt_tasks):
                raise ValueError(f"predict returned {len(alt)} arrays for {len(alt_tasks)} tasks")
            for j, i in enumerate(idx):
                ch = np.array(_task_changes(tasks[i], base[i], alt[j], None if gains is None else gains[i], k))
                ok = np.isfinite(ch)
                sums[i][ok] += ch[ok]
                counts[i][ok] += 1
        for i in present:
            if counts[i][0] == 0:  # no other value to try
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                avg = np.where(counts[i] > 0, sums[i] / np.maximum(counts[i], 1), np.nan)
            t = tasks[i]
            if gi is not None and attr in gi.columns and t.user_id in gi.index:
                grp = gi.at[t.user_id, attr]
            else:
                grp = own[i]
            rows.append({"scenario": t.scenario, "attribute": attr, "group": str(grp),
                         "mean_abs_delta": avg[0], "top10_jaccard": avg[1], "delta_ndcg": avg[2]})

    cols = ["mean_abs_delta", "top10_jaccard", "delta_ndcg"]
    frame = pd.DataFrame(rows, columns=["scenario", "attribute", "group", *cols])
    records: list[dict] = []
    for scenario, fs in frame.groupby("scenario", sort=True):
        overall = fs.groupby("attribute", sort=False)["mean_abs_delta"].mean()
        order = sorted(overall.index, key=lambda a: (-overall[a], list(attributes).index(a)))
        rank = {a: r + 1 for r, a in enumerate(order)}
        for attr in [a for a in attributes if a in rank]:
            fa = fs[fs["attribute"] == attr]
            parts = [("all", fa)] + [(str(g), fg) for g, fg in fa.groupby("group", sort=True)]
            for grp, fg in parts:
                rec = {"kind": "counterfactual", "model": name, "scenario": str(scenario), "attribute": attr,
                       "group": grp}
                for c in cols:
                    vals = fg[c].dropna()
                    rec[c] = float(vals.mean()) if len(vals) else float("nan")
                rec["rank"] = rank[attr]
                rec["n"] = int(len(fg))
                records.append(rec)
    return records
