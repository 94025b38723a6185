"""Profile-injection ("shilling") attacks: how easily can fake users push chosen items?

Attack models (REFERENCES.md, after Mobasher et al.'s taxonomy; push attacks):
- random: filler ratings drawn from the global rating distribution N(mean, std), rounded and
  clipped to the integer scale;
- average: filler ratings at each filler item's own mean rating (rounded, clipped);
- bandwagon: the `n_popular` most popular items rated rating_max, plus random filler as in the
  random attack.
Every fake profile rates every target item at rating_max. `filler_size` counts the non-target
items per profile (for bandwagon it includes the popular items). Fake user ids follow the largest
real id, so they never collide with real users.

Targets are long-tail items (`choose_targets`): outside the short head (the most popular items
that together hold 80% of the ratings) with at least `min_ratings` ratings, the items an attacker
would promote and a model can least defend.

The model is retrained (or re-adapted) by the caller. An experiment is planned as `AttackCell`s
(`plan_attack`: the clean run first, then each strategy at each fraction); a cell holds only
scalars, so a compute job can carry it to another process, which rebuilds the cell's fake profiles
from the training ratings (`AttackCell.fake_profiles`) and refits there. `attack_records` measures
the refits' outputs. `run_attack` does all three in this process with a closure
`fit_predict(extra_train_ratings) -> (pred_frame, topk_frame)` that adds the fake ratings to
training and predicts for the real evaluation users; an empty frame means the clean run.
pred_frame: user_id, item_id, y_pred (and optionally scenario) and must include the target items
for the evaluation users for the prediction shift to be defined; topk_frame: user_id, rank
(1-based), item_id (optionally scenario), the top-k over the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from audit.metrics import design_weights_of

RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
STRATEGIES = ("random", "average", "bandwagon")

FitPredict = Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]


def empty_ratings() -> pd.DataFrame:
    """A ratings frame with no rows and the canonical dtypes (the clean run's extra ratings)."""
    return pd.DataFrame({"user_id": pd.Series(dtype=np.int64), "item_id": pd.Series(dtype=np.int64),
                         "rating": pd.Series(dtype=np.float64), "timestamp": pd.Series(dtype=np.int64)})


def short_head(ratings: pd.DataFrame, share: float = 0.8) -> np.ndarray:
    """Item ids of the short head: the most popular items holding `share` of all ratings.

    Ties in popularity are broken by item id so the set is deterministic.
    """
    counts = ratings.groupby("item_id").size()
    if counts.empty:
        return np.array([], dtype=np.int64)
    order = np.lexsort((counts.index.to_numpy(), -counts.to_numpy()))
    c = counts.to_numpy()[order]
    cum = np.cumsum(c) / c.sum()
    n_head = int(np.searchsorted(cum, share - 1e-12) + 1)
    return counts.index.to_numpy()[order][:n_head].astype(np.int64)


def choose_targets(ratings: pd.DataFrame, n_targets: int, rng: np.random.Generator, *,
                   min_ratings: int = 5, head_share: float = 0.8) -> np.ndarray:
    """Long-tail target items (outside the short head, >= min_ratings ratings), sorted ids.

    Why: pushing an item nobody sees is what an attacker pays for, and sparse items are where a
    few fake ratings weigh most. Fewer than n_targets are returned when fewer qualify; none
    qualifying is an error.
    """
    counts = ratings.groupby("item_id").size()
    head = set(short_head(ratings, head_share).tolist())
    eligible = np.array(sorted(i for i, c in counts.items() if c >= min_ratings and i not in head), dtype=np.int64)
    if len(eligible) == 0:
        raise ValueError(f"no long-tail item has at least {min_ratings} ratings; lower min_ratings")
    pick = rng.choice(len(eligible), size=min(int(n_targets), len(eligible)), replace=False)
    return np.sort(eligible[pick])


def make_fake_profiles(ratings: pd.DataFrame, strategy: str, n_fake: int, targets: Sequence[int],
                       filler_size: int, rating_scale: tuple[int, int] = (1, 5),
                       rng: np.random.Generator | None = None, *, n_popular: int | None = None) -> pd.DataFrame:
    """Fake user profiles (user_id, item_id, rating, timestamp) for one attack.

    Why: the standard low-knowledge attacks of the literature, parameterised by the knobs that
    matter (number of profiles, filler size, targets). Filler items are drawn per profile without
    replacement from the rated items other than the targets (at most that many). n_popular
    (bandwagon only) defaults to max(1, filler_size // 5). Timestamps are one second after the last
    real rating. Deterministic for a given generator state.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if rng is None:
        raise ValueError("make_fake_profiles needs a seeded numpy Generator (rng=...)")
    lo, hi = int(rating_scale[0]), int(rating_scale[1])
    if lo > hi:
        raise ValueError(f"rating scale {rating_scale} is empty")
    n_fake, filler_size = int(n_fake), int(filler_size)
    if n_fake < 0 or filler_size < 0:
        raise ValueError("n_fake and filler_size must be >= 0")
    targets = np.unique(np.asarray(targets, dtype=np.int64))
    if n_fake == 0:
        return empty_ratings()

    item_stats = ratings.groupby("item_id")["rating"].agg(["mean", "size"])
    pool = np.array([i for i in item_stats.index.to_numpy(np.int64) if i not in set(targets.tolist())], dtype=np.int64)
    filler_size = min(filler_size, len(pool))
    mu = float(ratings["rating"].mean())
    sigma = float(ratings["rating"].std(ddof=0)) if len(ratings) > 1 else 0.0
    item_mean = item_stats["mean"]

    popular = np.array([], dtype=np.int64)
    if strategy == "bandwagon":
        n_pop = max(1, filler_size // 5) if n_popular is None else int(n_popular)
        n_pop = min(n_pop, filler_size)
        cand = item_stats.loc[pool]
        order = np.lexsort((cand.index.to_numpy(), -cand["size"].to_numpy()))
        popular = cand.index.to_numpy(np.int64)[order][:n_pop]
    rest_pool = np.setdiff1d(pool, popular)

    first_id = int(ratings["user_id"].max()) + 1 if len(ratings) else 1
    ts = int(ratings["timestamp"].max()) + 1 if len(ratings) and "timestamp" in ratings else 0
    users, items, values = [], [], []
    for f in range(n_fake):
        uid = first_id + f
        n_rand = filler_size - len(popular)
        filler = np.sort(rng.choice(rest_pool, size=n_rand, replace=False)) if n_rand > 0 else np.array([], np.int64)
        if strategy == "average":
            fr = np.clip(np.rint(item_mean.loc[filler].to_numpy(float)), lo, hi)
        else:
            fr = np.clip(np.rint(rng.normal(mu, sigma, size=len(filler))), lo, hi)
        prof_items = np.concatenate([targets, popular, filler])
        prof_ratings = np.concatenate([np.full(len(targets), hi, float), np.full(len(popular), hi, float), fr])
        users.append(np.full(len(prof_items), uid, np.int64))
        items.append(prof_items)
        values.append(prof_ratings)
    return pd.DataFrame({"user_id": np.concatenate(users).astype(np.int64),
                         "item_id": np.concatenate(items).astype(np.int64),
                         "rating": np.concatenate(values).astype(np.float64),
                         "timestamp": np.full(sum(len(u) for u in users), ts, np.int64)})


def _list_keys(frame: pd.DataFrame) -> list[str]:
    return ["user_id", "scenario"] if "scenario" in frame.columns else ["user_id"]


def _weighted(values: pd.Series, user_ids: pd.Series | pd.Index, weights: pd.Series | None) -> float:
    """Mean of `values`, each at its user's design weight when `weights` (user_id -> weight) is given."""
    if weights is None:
        return float(values.mean())
    return float(np.average(values.to_numpy(np.float64), weights=design_weights_of(user_ids, weights, "a value")))


def hit_ratio(topk: pd.DataFrame, targets: Sequence[int], k: int = 10,
              users: Sequence[int] | None = None, weights: pd.Series | None = None) -> float:
    """Share of recommendation lists (per user, per scenario if given) whose top-k has a target.
    `weights` (user_id -> design weight; audit.sampling): the users are a stratified sample, only
    they count, each list at its user's weight."""
    f = topk[topk["rank"] <= k]
    if weights is not None:
        users = weights.index
    if users is not None:
        f = f[f["user_id"].isin(users)]
    keys = _list_keys(f)
    if f.empty:
        return float("nan")
    hit = f.assign(_t=f["item_id"].isin(np.asarray(targets))).groupby(keys)["_t"].any()
    return _weighted(hit, hit.index.get_level_values("user_id"), weights)


def attack_effect(pred_clean: pd.DataFrame, pred_attacked: pd.DataFrame, topk_clean: pd.DataFrame,
                  topk_attacked: pd.DataFrame, targets: Sequence[int], *, k: int = 10,
                  users: Sequence[int] | None = None, weights: pd.Series | None = None) -> dict:
    """Prediction shift of the target items and hit ratio @k, clean and attacked.

    prediction_shift = mean over (user, target item) pairs predicted in both runs of
    y_pred(attacked) - y_pred(clean) (NaN when no target is predicted); `users` restricts both
    measures to the real evaluation users (default: everyone in the frames). `weights` (user_id ->
    design weight) restricts them to the sampled users and weights every mean by them.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if weights is not None:
        users = weights.index
    keys = [c for c in ("user_id", "scenario", "item_id") if c in pred_clean.columns and c in pred_attacked.columns]

    def sel(p: pd.DataFrame) -> pd.DataFrame:
        p = p[p["item_id"].isin(targets)]
        return p[p["user_id"].isin(users)] if users is not None else p

    both = sel(pred_clean)[keys + ["y_pred"]].merge(sel(pred_attacked)[keys + ["y_pred"]], on=keys,
                                                     suffixes=("_clean", "_attacked"))
    if both.empty:
        shift = clean_mean = att_mean = float("nan")
    else:
        clean_mean = _weighted(both["y_pred_clean"], both["user_id"], weights)
        att_mean = _weighted(both["y_pred_attacked"], both["user_id"], weights)
        shift = _weighted(both["y_pred_attacked"] - both["y_pred_clean"], both["user_id"], weights)
    return {"prediction_shift": shift, "target_pred_clean": clean_mean, "target_pred_attacked": att_mean,
            "hit_ratio": hit_ratio(topk_attacked, targets, k, users, weights),
            "hit_ratio_clean": hit_ratio(topk_clean, targets, k, users, weights),
            "n_pairs": int(len(both))}


@dataclass(frozen=True)
class AttackCell:
    """One refit of an attack experiment, in scalars: the clean run (`strategy` None) or strategy
    number i at fraction number j, whose profiles draw from default_rng([seed, i, j]) so that they
    do not depend on which other cells are run, nor where."""

    strategy: str | None
    fraction: float
    n_fake: int
    index: tuple[int, int]
    targets: tuple[int, ...]
    filler_size: int
    rating_scale: tuple[int, int]
    seed: int
    n_popular: int | None = None

    def fake_profiles(self, ratings: pd.DataFrame) -> pd.DataFrame:
        """The cell's fake ratings given the real training ratings (none for the clean run)."""
        if self.strategy is None:
            return empty_ratings()
        return make_fake_profiles(ratings, self.strategy, self.n_fake, self.targets, self.filler_size,
                                  self.rating_scale, np.random.default_rng([self.seed, *self.index]),
                                  n_popular=self.n_popular)


def plan_attack(ratings: pd.DataFrame, *, strategies: Sequence[str] = STRATEGIES,
                fractions: Sequence[float] = (0.01, 0.03, 0.05), targets: Sequence[int] | None = None,
                n_targets: int = 5, filler_size: int | None = None, rating_scale: tuple[int, int] = (1, 5),
                seed: int = 0, n_popular: int | None = None) -> list[AttackCell]:
    """The clean cell, then one cell per strategy and fraction (see `run_attack` for the defaults).

    ratings: the real training ratings (statistics for the filler, and the number of real users:
    n_fake = max(1, round_half_up(fraction * n_users))).
    """
    from audit.robustness import round_half_up

    if targets is None:
        targets = choose_targets(ratings, n_targets, np.random.default_rng(seed))
    targets = tuple(int(t) for t in np.unique(np.asarray(targets, dtype=np.int64)))
    if filler_size is None:
        filler_size = int(np.median(ratings.groupby("user_id").size())) if len(ratings) else 0
    common = dict(targets=targets, filler_size=int(filler_size),
                  rating_scale=(int(rating_scale[0]), int(rating_scale[1])), seed=int(seed), n_popular=n_popular)
    n_users = int(ratings["user_id"].nunique())
    cells = [AttackCell(None, 0.0, 0, (-1, -1), **common)]
    for i, strategy in enumerate(strategies):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        for j, fraction in enumerate(fractions):
            cells.append(AttackCell(strategy, float(fraction), int(max(1, round_half_up(float(fraction) * n_users))),
                                    (i, j), **common))
    return cells


def attack_records(cells: Sequence[AttackCell], runs: Sequence[tuple[pd.DataFrame, pd.DataFrame]], *,
                   model_name: str, k: int = 10, users: Sequence[int] | None = None,
                   weights: pd.Series | None = None) -> list[dict]:
    """`shilling` records of a planned experiment from its refits' (pred_frame, topk_frame), in
    cell order: model, strategy, fraction, n_fake, prediction_shift, hit_ratio, hit_ratio_clean
    (plus target_pred_clean, target_pred_attacked, n_targets, filler_size, k, n_pairs). `weights`:
    the sampled users' design weights (attack_effect)."""
    if len(cells) != len(runs) or not cells or cells[0].strategy is not None:
        raise ValueError(f"{len(runs)} refits for {len(cells)} cells; expected one per cell, the clean cell first")
    (pred_clean, topk_clean), targets = runs[0], np.asarray(cells[0].targets, dtype=np.int64)
    records = []
    for cell, (pred_att, topk_att) in zip(cells[1:], runs[1:]):
        eff = attack_effect(pred_clean, pred_att, topk_clean, topk_att, targets, k=k, users=users, weights=weights)
        records.append({"kind": "shilling", "model": model_name, "strategy": cell.strategy,
                        "fraction": cell.fraction, "n_fake": cell.n_fake,
                        "prediction_shift": eff["prediction_shift"], "hit_ratio": eff["hit_ratio"],
                        "hit_ratio_clean": eff["hit_ratio_clean"],
                        "target_pred_clean": eff["target_pred_clean"],
                        "target_pred_attacked": eff["target_pred_attacked"],
                        "n_targets": int(len(targets)), "filler_size": cell.filler_size, "k": int(k),
                        "n_pairs": eff["n_pairs"]})
    return records


def run_attack(fit_predict: FitPredict, ratings: pd.DataFrame, *, model_name: str,
               strategies: Sequence[str] = STRATEGIES, fractions: Sequence[float] = (0.01, 0.03, 0.05),
               targets: Sequence[int] | None = None, n_targets: int = 5, filler_size: int | None = None,
               rating_scale: tuple[int, int] = (1, 5), seed: int = 0, k: int = 10,
               users: Sequence[int] | None = None, n_popular: int | None = None) -> list[dict]:
    """Inject fake profiles for each strategy and fraction, refit through `fit_predict`, measure.

    Why: retraining is model-specific, so the caller supplies it as a closure; this module owns
    the attack design and the measurement. ratings: the real training ratings. targets default to
    `choose_targets(ratings, n_targets, default_rng(seed))`; filler_size defaults to the median
    real profile size. The refits run here one after another; a stage that runs them as compute
    jobs uses `plan_attack` and `attack_records` directly (same records).
    """
    cells = plan_attack(ratings, strategies=strategies, fractions=fractions, targets=targets, n_targets=n_targets,
                        filler_size=filler_size, rating_scale=rating_scale, seed=seed, n_popular=n_popular)
    runs = [fit_predict(cell.fake_profiles(ratings)) for cell in cells]
    return attack_records(cells, runs, model_name=model_name, k=k, users=users)
