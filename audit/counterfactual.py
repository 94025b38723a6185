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

Records (docs/DESIGN.md, fairness.json `counterfactual`): per scenario and attribute, one per
original group of the user and one with group "all"; `rank` orders attributes by overall
mean_abs_delta within a scenario (1 = most influential); `n` counts users; `seeds` lists the
training seeds whose models were asked (each user's changes are averaged over them first);
`substitutes` names the groups substituted. A model that ignores the attribute gives exactly 0, 1
and 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from audit.robustness import _is_missing, _sorted_values

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


def gains_from_relevant(tasks: Sequence["Task"], relevant: Mapping[int, set]) -> list[np.ndarray]:
    """Binary gains: 1 for candidates in the user's relevant set (e.g. held-out items rated >= 4)."""
    return [np.isin(np.asarray(t.candidates), np.asarray(sorted(relevant.get(t.user_id, ())),
                                                         dtype=np.asarray(t.candidates).dtype)).astype(float)
            for t in tasks]


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
def _task_changes(t: "Task", base: np.ndarray, alt: np.ndarray, gain: np.ndarray | None,
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


CHANGES = ["mean_abs_delta", "top10_jaccard", "delta_ndcg"]


def counterfactual_changes(model: "Recommender", tasks: Sequence["Task"], attributes: Sequence[str], *,
                           gains: Sequence[np.ndarray] | None = None,
                           values: Mapping[str, Mapping[str, object] | Sequence[object]] | None = None,
                           own: pd.DataFrame | None = None, k: int = 10, seed: int = 0) -> pd.DataFrame:
    """Per task and attribute: the three changes averaged over the substitutes (see the module docstring).

    - values: per attribute, {group label: substitute value} (`substitutes`), or a list of raw
      values (each its own label); default the values observed in `tasks`.
    - own: user_id plus the user's group label per attribute (`own_groups`); default the raw value
      as a string. A substitute is skipped for users already in its group.
    - seed: ties are broken by np.random.default_rng([seed, task index]).
    Tasks whose value of the attribute is missing are skipped for that attribute. Columns: user_id,
    scenario, attribute, own, mean_abs_delta, top10_jaccard, delta_ndcg, substitutes.
    """
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
                ch = np.array(_task_changes(tasks[i], base[i], alt[j], None if gains is None else gains[i], k,
                                            keys[i]))
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


def counterfactual_records(changes: pd.DataFrame, attributes: Sequence[str], *, model_name: str,
                           groups: pd.DataFrame | None = None, seeds: Sequence[int] = (0,)) -> list[dict]:
    """Records from `counterfactual_changes` frames of one model (a `seed` column when several).

    Each user's changes are first averaged over seeds, so users (not seed x user pairs) are the unit.
    groups: optional user_id -> label columns (e.g. strata with small groups merged) naming the
    user's group in the records; default the user's own group label.
    """
    keys = ["user_id", "scenario", "attribute", "own", "substitutes"]
    per_user = changes.groupby(keys, sort=False, dropna=False)[CHANGES].mean().reset_index()
    gi = groups.set_index("user_id") if groups is not None else None
    if gi is not None:
        lookup = [gi[a].get(u, o) if a in gi.columns else o
                  for u, a, o in zip(per_user["user_id"], per_user["attribute"], per_user["own"])]
        per_user["group"] = [str(g) for g in lookup]
    else:
        per_user["group"] = per_user["own"].astype(str)
    records: list[dict] = []
    for scenario, fs in per_user.groupby("scenario", sort=True):
        overall = fs.groupby("attribute", sort=False)["mean_abs_delta"].mean()
        order = sorted(overall.index, key=lambda a: (-overall[a], list(attributes).index(a)))
        rank = {a: r + 1 for r, a in enumerate(order)}
        for attr in [a for a in attributes if a in rank]:
            fa = fs[fs["attribute"] == attr]
            parts = [("all", fa)] + [(str(g), fg) for g, fg in fa.groupby("group", sort=True)]
            for grp, fg in parts:
                rec = {"kind": "counterfactual", "model": model_name, "scenario": str(scenario), "attribute": attr,
                       "group": grp}
                for c in CHANGES:
                    vals = fg[c].dropna()
                    rec[c] = float(vals.mean()) if len(vals) else float("nan")
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
