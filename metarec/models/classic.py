"""Classic (non-meta) baselines: global mean, biases, popularity, item-kNN and SVD.

The bias, item-kNN and SVD algorithms come from scikit-surprise (a well-kept library of the classic
explicit-rating algorithms); re-implementing them would only add places for bugs to hide, and
using the reference implementation makes the baselines comparable with the literature.
Popularity is not in surprise, so it is computed here (a few lines of pandas).

Cold-start protocol (the standard one for non-meta models): a classic model cannot adapt to a new
user without refitting, so `predict(tasks)` fits the algorithm on the training ratings plus the
support ratings of the given tasks ("fold-in"), then scores each task's candidates. Query ratings
are never seen: `Task` does not carry them. Details that keep the tasks of one call apart:

- every task gets its own pseudo-user keyed by (user id, hash of its support), so two tasks of one
  user with different supports (e.g. user_cold and user_item_cold, or a perturbed copy) do not
  merge into one profile, while identical tasks share one;
- a training user that appears in a task (warm, item_cold) is moved to that pseudo-user: their
  training ratings plus the support (support ratings override the training rating of the same
  item), so the training history is kept and nothing is counted twice.

The fitted algorithm is cached, keyed by a hash of the folded-in rows, so repeated calls with the
same supports (counterfactual attribute swaps, repeated audits) do not refit. Unknown users and
items get surprise's own fallback (global mean plus whatever biases are known); all predictions
are clipped to the rating scale. Default hyperparameters were chosen with `tune` on ML-100K
validation users only (pooled val-query MAE; see each class). Models persist as config.json + the training ratings in parquet
(never pickle): refitting is cheap and deterministic, so no fitted state needs to be stored.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from metarec.errors import ConfigError
from metarec.features import FeatureEncoder
from metarec.io import atomic_write_json, atomic_write_parquet
from metarec.models.base import CONFIG, Estimator
from metarec.tasks import Task, TaskSet

RATING_COLUMNS = ["user_id", "item_id", "rating"]


# ---------------------------------------------------------------------------------------- helpers
def _support_digest(task: Task) -> str:
    """Content hash of one support set (order-independent), so identical tasks share a user."""
    order = np.argsort(np.asarray(task.support_items, dtype=np.int64), kind="stable")
    items = np.asarray(task.support_items, dtype=np.int64)[order]
    ratings = np.asarray(task.support_ratings, dtype=np.float64)[order]
    h = hashlib.sha256()
    h.update(np.int64(task.user_id).tobytes())
    h.update(items.tobytes())
    h.update(ratings.tobytes())
    return h.hexdigest()[:16]


def task_user_key(task: Task) -> str:
    """The raw user id a task's support is folded in under."""
    return f"task:{int(task.user_id)}:{_support_digest(task)}"


def fold_in(train_ratings: pd.DataFrame, tasks: Sequence[Task]) -> tuple[pd.DataFrame, list[str], str]:
    """Training ratings plus the tasks' supports, as (user, item, rating) rows in a fixed order.

    Returns the rows (column `user` holds int ids for training users and string pseudo-user keys
    for tasks), each task's user key, and a hash of the folded-in part (the cache key). A task's
    pseudo-user carries its support (the last rating wins for a repeated item) plus whatever that
    user already has in training for other items; folded rows are ordered by (key, item id).
    Vectorised over tasks: robustness and shilling runs fold in hundreds of tasks, many times.
    """
    keys = [task_user_key(t) for t in tasks]
    seen: dict[str, Task] = {}
    for k, t in zip(keys, tasks):
        seen.setdefault(k, t)
    order = sorted(seen)
    owner_ids = np.array([int(seen[k].user_id) for k in order], dtype=np.int64)
    moved = set(owner_ids.tolist())
    is_moved = train_ratings["user_id"].isin(moved).to_numpy()
    base = train_ratings[~is_moved]
    lens = np.array([len(seen[k].support_items) for k in order], dtype=np.int64)
    key_col = np.array(order, dtype=object)
    support = pd.DataFrame({
        "user": np.repeat(key_col, lens),
        "item_id": np.concatenate([np.asarray(seen[k].support_items, dtype=np.int64) for k in order] or
                                  [np.zeros(0, np.int64)]),
        "rating": np.concatenate([np.asarray(seen[k].support_ratings, dtype=np.float64) for k in order] or
                                 [np.zeros(0)]),
    }).drop_duplicates(["user", "item_id"], keep="last")
    history = train_ratings.loc[is_moved, ["user_id", "item_id", "rating"]].merge(
        pd.DataFrame({"user": key_col, "user_id": owner_ids}), on="user_id", how="inner")
    history = history.merge(support[["user", "item_id"]].assign(in_support=True), on=["user", "item_id"], how="left")
    history = history[history["in_support"].isna()]
    folded = pd.concat([history[["user", "item_id", "rating"]], support], ignore_index=True)
    folded = folded.sort_values(["user", "item_id"], kind="stable").reset_index(drop=True)
    folded = folded.astype({"user": object, "item_id": np.int64, "rating": np.float64})
    h = hashlib.sha256()
    h.update(json.dumps(sorted(moved)).encode())
    h.update("\n".join(folded["user"].astype(str)).encode())
    h.update(folded["item_id"].to_numpy(np.int64).tobytes())
    h.update(folded["rating"].to_numpy(np.float64).tobytes())
    rows = pd.concat([
        pd.DataFrame({"user": base["user_id"].astype(object).to_numpy(), "item_id": base["item_id"].to_numpy(np.int64),
                      "rating": base["rating"].to_numpy(np.float64)}),
        folded,
    ], ignore_index=True)
    return rows, keys, h.hexdigest()


def _surprise_trainset(rows: pd.DataFrame, scale: tuple[float, float]):
    from surprise import Dataset, Reader

    data = Dataset.load_from_df(rows[["user", "item_id", "rating"]], Reader(rating_scale=scale))
    return data.build_full_trainset()


@dataclass(frozen=True)
class IdIndex:
    """Raw item ids -> positions (surprise inner ids, or rows of a table), as sorted arrays.

    Built once per fit, so that scoring a catalogue maps every candidate with one `searchsorted`
    rather than one dictionary lookup per (user, item) pair.
    """

    raw: np.ndarray       # sorted raw ids
    position: np.ndarray  # position of raw[j]

    @classmethod
    def of(cls, mapping: Mapping[Any, int]) -> "IdIndex":
        raw = np.fromiter((int(k) for k in mapping), dtype=np.int64, count=len(mapping))
        position = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
        order = np.argsort(raw, kind="stable")
        return cls(raw[order], position[order])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id, -1 for an id the index does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.raw, ids), max(len(self.raw) - 1, 0))
        hit = (self.raw[at] == ids) if len(self.raw) else np.zeros(len(ids), dtype=bool)
        return np.where(hit, self.position[at] if len(self.raw) else -1, -1)


@dataclass(frozen=True)
class SurpriseFit:
    """A fitted surprise algorithm and its item index (raw item id -> inner id)."""

    algo: Any
    items: IdIndex

    def inner_user(self, user_key: str) -> int | None:
        try:
            return self.algo.trainset.to_inner_uid(user_key)
        except ValueError:
            return None


# ---------------------------------------------------------------------------------------- base class
class ClassicRecommender(Estimator):
    """Shared fit/predict/save logic; subclasses say how to fit on the folded rows and score.

    Constructor arguments are the hyperparameters (stored as given; see `Estimator`).
    """

    cache_size: ClassVar[int] = 4
    # Predictions depend on every support folded in together: callers must not split the tasks.
    predict_chunk: ClassVar[int | None] = None
    train_ratings_: pd.DataFrame | None = None

    def __init__(self, seed: int = 0, rating_scale: tuple[float, float] | None = None) -> None:
        self.seed = seed
        self.rating_scale = rating_scale

    # -------------------------------------------------------------- fitting
    def _check_params(self) -> None:
        rs = self.rating_scale
        if rs is not None and not (len(rs) == 2 and float(rs[0]) < float(rs[1])):
            raise ConfigError(f"{self.name}: rating_scale must be None or [min, max] with min < max, got {rs!r}.")

    def _fit(self, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder | None) -> "ClassicRecommender":
        """Store the training ratings (support and query rows of the training tasks).

        The algorithm itself is fitted lazily in `predict`, where the supports to fold in are
        known. `val` is unused (hyperparameters are chosen by `tune`), and so is `encoder`: these
        models see item ids only.
        """
        return self._set_train(train.all_ratings())

    def _set_train(self, ratings: pd.DataFrame) -> "ClassicRecommender":
        r = ratings[RATING_COLUMNS].copy()
        r["user_id"] = r["user_id"].astype(np.int64)
        r["item_id"] = r["item_id"].astype(np.int64)
        r["rating"] = r["rating"].astype(np.float64)
        r = r.sort_values(["user_id", "item_id"], kind="stable").drop_duplicates(["user_id", "item_id"], keep="last")
        if r.empty:
            raise ConfigError(f"{self.name}: the training split has no ratings to fit on.")
        self.train_ratings_ = r.reset_index(drop=True)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        return self

    @property
    def scale_(self) -> tuple[float, float]:
        """The rating scale predictions are clipped to (given, or the training min/max)."""
        if self.rating_scale is not None:
            return float(self.rating_scale[0]), float(self.rating_scale[1])
        r = self._train()["rating"]
        return float(r.min()), float(r.max())

    def _train(self) -> pd.DataFrame:
        if self.train_ratings_ is None:
            raise ConfigError(f"{self.name}: call fit() before predict().")
        return self.train_ratings_

    def _fitted(self, tasks: Sequence[Task]) -> tuple[Any, list[str]]:
        rows, keys, digest = fold_in(self._train(), tasks)
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return self._cache[digest], keys
        state = self._fit_rows(rows)
        self._cache[digest] = state
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return state, keys

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """Fold the supports in, fit (or reuse the cached fit), and score each task's candidates."""
        tasks = list(tasks)
        return self.scorer(tasks)(tasks) if tasks else []

    def _task_key(self, task: Task) -> str:
        return task_user_key(task)

    def scorer(self, tasks: Sequence[Task]) -> Callable[[Sequence[Task]], list[np.ndarray]]:
        """Fit once on the supports of all `tasks` (the fold-in), and return a function that scores
        any of these tasks with whatever candidates it is given, a chunk of tasks at a time.

        Why: predictions depend on every support folded in together, so the fit must see the whole
        split, but a catalogue of candidates per task need not be held for all tasks at once.
        Scoring a task that was not among `tasks` is refused (it would silently be a stranger).
        """
        tasks = list(tasks)
        state, keys = self._fitted(tasks)
        known = set(keys)
        lo, hi = self.scale_

        def score(chunk: Sequence[Task]) -> list[np.ndarray]:
            out = []
            for t in chunk:
                key = self._task_key(t)
                if key not in known:
                    raise ValueError(f"{self.name}: user {t.user_id} ({t.scenario}) was not among the tasks this "
                                     "scorer was fitted on; expected one of them (same user and support)")
                p = self._score(state, key, np.asarray(t.candidates, dtype=np.int64))
                out.append(np.clip(np.asarray(p, dtype=np.float64), lo, hi))
            return out
        return score

    # subclass hooks
    def _fit_rows(self, rows: pd.DataFrame) -> Any:
        raise NotImplementedError

    def _score(self, state: Any, user_key: str, items: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -------------------------------------------------------------- persistence (JSON + parquet)
    def save(self, directory: str | Path) -> None:
        """config.json (model name, hyperparameters, seed), train_ratings.parquet, history.json."""
        d = Path(directory)
        atomic_write_json(d / CONFIG, {"model": self.name, "params": self.config_params()})
        atomic_write_parquet(d / "train_ratings.parquet", self._train())
        atomic_write_json(d / "history.json", [])

    @classmethod
    def load(cls, directory: str | Path, train: TaskSet | None = None) -> "ClassicRecommender":
        """Rebuild from config.json and the stored training ratings (`train` is not needed)."""
        model = cls.from_config_params(cls.read_config(directory)["params"])
        return model._set_train(pd.read_parquet(Path(directory) / "train_ratings.parquet"))


# ---------------------------------------------------------------------------------------- models
class GlobalMean(ClassicRecommender):
    """Every prediction is the mean training rating: the floor any model must beat.

    Deliberately ignores supports (it is the training data's mean, not a fold-in model).
    """

    name = "mean"
    description = ("the global mean: every prediction is the mean of all training ratings, for every user and item "
                   "(support ratings are ignored)")

    def _task_key(self, task: Task) -> str:
        return ""

    def _fitted(self, tasks: Sequence[Task]) -> tuple[Any, list[str]]:
        return float(self._train()["rating"].mean()), ["" for _ in tasks]

    def _score(self, state: float, user_key: str, items: np.ndarray) -> np.ndarray:
        return np.full(len(items), state, dtype=np.float64)


class Popularity(ClassicRecommender):
    """Item popularity as a rating: (sum of the item's ratings + k * mu) / (n ratings + k).

    mu is the global mean of the fitted rows (training plus folded-in supports). The shrinkage `k`
    pulls rarely rated items toward mu, so an item scores high only if it is both well rated and
    rated often: ranking by this score favours popular, well-rated items, and an item nobody has
    rated gets mu. The prediction does not depend on the user. Default k = 5: on ML-100K
    validation users k = 1 had a 0.0014 lower MAE, but ranks once-rated 5-star items on top.
    """

    name = "pop"
    description = ("item popularity: each item's ratings averaged with `shrinkage` pseudo-ratings at the global mean, "
                   "so well-rated, often-rated items score highest; the same score for every user")

    def __init__(self, shrinkage: float = 5.0, seed: int = 0, rating_scale: tuple[float, float] | None = None) -> None:
        super().__init__(seed=seed, rating_scale=rating_scale)
        self.shrinkage = shrinkage

    def _check_params(self) -> None:
        super()._check_params()
        if not float(self.shrinkage) >= 0:
            raise ConfigError(f"pop: shrinkage must be >= 0, got {self.shrinkage!r}.")

    def _fit_rows(self, rows: pd.DataFrame) -> tuple[float, IdIndex, np.ndarray]:
        mu = float(rows["rating"].mean())
        g = rows.groupby("item_id")["rating"].agg(["sum", "count"])
        k = float(self.shrinkage)
        score = ((g["sum"] + k * mu) / (g["count"] + k)).to_numpy(np.float64)
        return mu, IdIndex(g.index.to_numpy(np.int64), np.arange(len(g), dtype=np.int64)), score

    def _score(self, state: tuple[float, IdIndex, np.ndarray], user_key: str, items: np.ndarray) -> np.ndarray:
        mu, index, score = state
        at = index.lookup(items)
        return np.where(at >= 0, score[np.maximum(at, 0)] if len(score) else mu, mu)


class _SurpriseRecommender(ClassicRecommender):
    """Fits a surprise algorithm on the folded rows; scores through surprise's own `predict`
    (so unknown users/items get its fallback) unless a subclass vectorises it."""

    def _algorithm(self):
        raise NotImplementedError

    def _fit_rows(self, rows: pd.DataFrame) -> SurpriseFit:
        algo = self._algorithm()
        algo.fit(_surprise_trainset(rows, self.scale_))
        return SurpriseFit(algo, IdIndex.of(algo.trainset._raw2inner_id_items))

    def _score(self, fit: SurpriseFit, user_key: str, items: np.ndarray) -> np.ndarray:
        return np.array([fit.algo.predict(user_key, int(i), clip=False).est for i in items], dtype=np.float64)


def _bias_score(fit: SurpriseFit, user_key: str, items: np.ndarray, factors: bool) -> np.ndarray:
    """Vectorised mu + b_u + b_i (+ p_u.q_i when both are known), exactly surprise's estimate,
    so that scoring a whole catalogue takes a few array operations, not one Python call per item:
    the candidates are mapped to inner ids through the fit's index, the user once per task."""
    algo = fit.algo
    est = np.full(len(items), algo.trainset.global_mean, dtype=np.float64)
    u = fit.inner_user(user_key)
    inner = fit.items.lookup(items)
    known = inner >= 0
    if u is not None:
        est += algo.bu[u]
    est[known] += np.asarray(algo.bi)[inner[known]]
    if factors and u is not None and known.any():
        est[known] += np.asarray(algo.qi)[inner[known]] @ np.asarray(algo.pu)[u]
    return est


def _als_options(model: ClassicRecommender) -> dict:
    """surprise's ALS baseline options from a model's n_epochs, reg_u and reg_i."""
    return {"method": "als", "n_epochs": int(model.n_epochs), "reg_u": float(model.reg_u),
            "reg_i": float(model.reg_i)}


class BiasBaseline(_SurpriseRecommender):
    """surprise BaselineOnly (mu + b_u + b_i) with biases fitted by ALS."""

    name = "bias"
    description = ("baseline predictor: global mean plus a user bias and an item bias fitted by alternating least "
                   "squares (scikit-surprise BaselineOnly), refitted with the new user's support ratings folded in")

    def __init__(self, n_epochs: int = 10, reg_u: float = 5.0, reg_i: float = 5.0, seed: int = 0,
                 rating_scale: tuple[float, float] | None = None) -> None:
        super().__init__(seed=seed, rating_scale=rating_scale)
        self.n_epochs, self.reg_u, self.reg_i = n_epochs, reg_u, reg_i

    def bsl_options(self) -> dict:
        return _als_options(self)

    def _algorithm(self):
        from surprise import BaselineOnly

        return BaselineOnly(bsl_options=self.bsl_options(), verbose=False)

    def _score(self, fit: SurpriseFit, user_key: str, items: np.ndarray) -> np.ndarray:
        return _bias_score(fit, user_key, items, factors=False)


class ItemKNN(_SurpriseRecommender):
    """surprise KNNBaseline, item-based, pearson_baseline similarity (shrunk by `shrinkage`),
    ALS baselines; with fewer than `min_k` positive neighbours it falls back to the baseline."""

    name = "itemknn"
    description = ("item-based k-nearest neighbours: baseline prediction plus the similarity-weighted deviations of "
                   "the user's ratings of the k most similar items (scikit-surprise KNNBaseline, shrunk "
                   "Pearson-baseline similarity), refitted with the new user's support ratings folded in")

    def __init__(self, k: int = 20, min_k: int = 1, shrinkage: int = 100, n_epochs: int = 10, reg_u: float = 15.0,
                 reg_i: float = 10.0, seed: int = 0, rating_scale: tuple[float, float] | None = None) -> None:
        super().__init__(seed=seed, rating_scale=rating_scale)
        self.k, self.min_k, self.shrinkage = k, min_k, shrinkage
        self.n_epochs, self.reg_u, self.reg_i = n_epochs, reg_u, reg_i

    def _check_params(self) -> None:
        super()._check_params()
        if int(self.k) < 1 or int(self.min_k) < 0:
            raise ConfigError(f"itemknn: k must be >= 1 and min_k >= 0, got k={self.k!r}, min_k={self.min_k!r}.")

    def _algorithm(self):
        from surprise import KNNBaseline

        return KNNBaseline(k=int(self.k), min_k=int(self.min_k),
                           sim_options={"name": "pearson_baseline", "user_based": False,
                                        "shrinkage": int(self.shrinkage)},
                           bsl_options=_als_options(self), verbose=False)

    def _score(self, fit: SurpriseFit, user_key: str, items: np.ndarray) -> np.ndarray:
        """Vectorised KNNBaseline estimate: b_ui + sum(sim * (r_uj - b_uj)) / sum(sim) over the k
        most similar items the user rated, positive similarities only (surprise's own rule,
        including its fallbacks), so that scoring a whole catalogue takes one matrix operation."""
        est = _bias_score(fit, user_key, items, factors=False)
        algo, ts = fit.algo, fit.algo.trainset
        u = fit.inner_user(user_key)
        if u is None:
            return est
        inner = fit.items.lookup(items)
        known = inner >= 0
        rated = ts.ur[u]
        if not known.any() or not rated:
            return est
        j = np.fromiter((x for x, _ in rated), dtype=np.int64, count=len(rated))
        r = np.fromiter((y for _, y in rated), dtype=np.float64, count=len(rated))
        dev = r - (ts.global_mean + np.asarray(algo.bi)[j] + algo.bu[u])
        sim = np.asarray(algo.sim)[np.ix_(inner[known], j)]
        k = int(self.k)
        if k < len(j):
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            sim, dev = np.take_along_axis(sim, idx, axis=1), dev[idx]
        else:
            dev = np.broadcast_to(dev, sim.shape)
        pos = sim > 0
        sum_sim = np.where(pos, sim, 0.0).sum(axis=1)
        sum_dev = np.where(pos, sim * dev, 0.0).sum(axis=1)
        sum_dev[pos.sum(axis=1) < int(self.min_k)] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            est[known] += np.where(sum_sim > 0, sum_dev / np.where(sum_sim > 0, sum_sim, 1.0), 0.0)
        return est


class SVDRecommender(_SurpriseRecommender):
    """surprise SVD (biased matrix factorisation by SGD), seeded through random_state."""

    name = "svd"
    description = ("biased matrix factorisation (global mean, user and item biases and latent factors) trained by "
                   "SGD (scikit-surprise SVD), refitted with the new user's support ratings folded in")

    def __init__(self, n_factors: int = 100, n_epochs: int = 40, lr_all: float = 0.005, reg_all: float = 0.05,
                 init_std_dev: float = 0.1, seed: int = 0, rating_scale: tuple[float, float] | None = None) -> None:
        super().__init__(seed=seed, rating_scale=rating_scale)
        self.n_factors, self.n_epochs = n_factors, n_epochs
        self.lr_all, self.reg_all, self.init_std_dev = lr_all, reg_all, init_std_dev

    def _algorithm(self):
        from surprise import SVD

        return SVD(n_factors=int(self.n_factors), n_epochs=int(self.n_epochs), lr_all=float(self.lr_all),
                   reg_all=float(self.reg_all), init_std_dev=float(self.init_std_dev), random_state=int(self.seed),
                   verbose=False)

    def _score(self, fit: SurpriseFit, user_key: str, items: np.ndarray) -> np.ndarray:
        return _bias_score(fit, user_key, items, factors=True)


def query_mae(model, tasks_with_truth: Sequence[tuple[Task, np.ndarray]]) -> float:
    """MAE over all query ratings pooled (each task's candidates are its query items)."""
    preds = model.predict([t for t, _ in tasks_with_truth])
    y = np.concatenate([np.asarray(q, dtype=np.float64) for _, q in tasks_with_truth] or [np.zeros(0)])
    p = np.concatenate(preds or [np.zeros(0)])
    return float(np.mean(np.abs(p - y))) if len(y) else float("nan")


def tune(model_name: str, train: TaskSet, val: TaskSet, grid: Mapping[str, Iterable] | Sequence[Mapping[str, Any]],
         seed: int = 0, return_scores: bool = False):
    """Pick hyperparameters on validation tasks only: fit on train (+ val supports, folded in by
    predict) for every combination of `grid` and keep the lowest pooled val-query MAE.

    `grid` is a dict of value lists (all combinations) or a list of dicts. Ties keep the first.
    Returns the best params (and, with return_scores, a list of (params, mae)).
    """
    from sklearn.model_selection import ParameterGrid

    from metarec.models.registry import build

    combos = list(ParameterGrid(grid if isinstance(grid, Mapping) else list(grid)))
    if not combos:
        raise ConfigError(f"tune({model_name!r}): empty grid.")
    truth = val.tasks_with_truth()
    scores: list[tuple[dict, float]] = []
    for params in combos:
        model = build(model_name, params, seed).fit(train)
        scores.append((dict(params), query_mae(model, truth)))
    best = min(range(len(scores)), key=lambda i: (scores[i][1], i))
    return (scores[best][0], scores) if return_scores else scores[best][0]
