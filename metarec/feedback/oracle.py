"""Ground-truth preferences for the feedback simulation: what every user would rate every item.

Why an oracle at all: a closed loop shows users items they never rated, so their reaction has to
come from somewhere. It comes from a model fitted on all ratings of the dataset, of a different
family from the audited models so that the audit does not grade a model against its own kind:

- ``gbdt``: a gradient-boosted tree ensemble (scikit-learn's HistGradientBoostingRegressor) over
  user attributes, item features and shrunk target encodings (user bias, item bias and the user's
  affinity to the item's genres). No audited model is a tree ensemble.
- ``nmf``: a non-negative factorisation of the rating matrix completed by EM-style imputation
  (missing cells start at the bias baseline, then take the reconstruction), fitted by HALS on the
  completed matrix held as low rank plus sparse, so that its cost is linear in the ratings.

Both give an expected rating per (user, item), the true utility. A simulated rating is that
utility plus Gaussian noise, rounded and clipped to the rating scale; the noise level is calibrated
so that simulated ratings on the observed (user, item) pairs have the variance of the observed
ratings (`calibrate_sigma`). Running the audit under both oracles shows how much its conclusions
depend on the choice of ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.schema import RatingData
from metarec.errors import ConfigError
from metarec.seeding import rng

FAMILIES = ("gbdt", "nmf")
_SHRINK = 5.0          # pseudo-count of the bias and affinity encodings (a user with 5 ratings keeps half)
_MAX_CATEGORIES = 255  # HistGradientBoosting's limit for a categorical column
# The gbdt oracle fits on at most this many ratings (a seeded sample beyond it): 50 trees of 31
# leaves learn nothing more from more rows, and the feature matrix of 10M ratings is 2 GB before
# scikit-learn copies it. Every size up to MovieLens-1M fits on all its ratings, as before.
GBDT_MAX_FIT = 2_000_000


@dataclass(frozen=True)
class Oracle:
    """Expected ratings of every (user, item) pair of the dataset, plus the calibrated noise."""

    family: str
    user_ids: np.ndarray          # sorted
    item_ids: np.ndarray          # sorted
    utility: np.ndarray           # [n_users, n_items], on the rating scale
    sigma: float                  # standard deviation of the rating noise
    rating_min: float
    rating_max: float
    fit_rmse: float               # RMSE of the utility against the observed ratings

    def rows(self, users: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.user_ids, np.asarray(users, dtype=np.int64))

    def cols(self, items: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.item_ids, np.asarray(items, dtype=np.int64))

    def draw(self, utility: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Ratings for given utilities and standard-normal draws z (same shape)."""
        r = np.rint(np.asarray(utility, dtype=float) + self.sigma * np.asarray(z, dtype=float))
        return np.clip(r, self.rating_min, self.rating_max)


_ARRAYS = ("user_ids", "item_ids", "utility")
_SCALARS = ("sigma", "rating_min", "rating_max", "fit_rmse")


def save_oracles(path: str | Path, oracles: Mapping[str, Oracle]) -> Path:
    """Write fitted oracles to one uncompressed .npz of plain arrays (never pickle): how a stage hands
    them to its compute jobs, which read them back with `load_oracles`."""
    arrays: dict[str, np.ndarray] = {"families": np.array([o.family for o in oracles.values()])}
    for i, o in enumerate(oracles.values()):
        arrays.update({f"{i}.{k}": np.asarray(getattr(o, k)) for k in (*_ARRAYS, *_SCALARS)})
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


def load_oracles(path: str | Path) -> dict[str, Oracle]:
    """The oracles `save_oracles` wrote, by family; arrays only (`allow_pickle=False`)."""
    with np.load(path, allow_pickle=False) as z:
        return {str(fam): Oracle(str(fam), *(z[f"{i}.{k}"] for k in _ARRAYS), *(float(z[f"{i}.{k}"]) for k in _SCALARS))
                for i, fam in enumerate(z["families"])}


def fit_oracle(family: str, data: RatingData, seed: int, rank: int = 16, only_users: np.ndarray | None = None) -> Oracle:
    """Fit one oracle family on all ratings of `data` and calibrate its noise.

    `only_users`: the users whose utilities are kept (default all); the fit always uses every rating,
    and keeping only the simulated users spares predicting the whole user x item grid."""
    if family not in FAMILIES:
        raise ConfigError(f"params.yaml feedback.oracles: unknown oracle {family!r}; expected some of {', '.join(FAMILIES)}")
    users = np.sort(data.users["user_id"].to_numpy(np.int64))
    items = np.sort(data.items["item_id"].to_numpy(np.int64))
    r = data.ratings
    ui = np.searchsorted(users, r["user_id"].to_numpy(np.int64))
    ii = np.searchsorted(items, r["item_id"].to_numpy(np.int64))
    y = r["rating"].to_numpy(np.float64)
    lo, hi = float(data.spec.rating_min), float(data.spec.rating_max)
    keep = (np.arange(len(users)) if only_users is None
            else np.searchsorted(users, np.unique(np.asarray(only_users, dtype=np.int64))))
    if family == "gbdt":
        mu, fitted = _gbdt_utility(data, users, items, ui, ii, y, seed, keep)
    else:
        w, h = _nmf_factors(len(users), len(items), ui, ii, y, rank, seed)
        mu, fitted = w[keep] @ h, _rowdots(w, h.T, ui, ii)
    mu, fitted = np.clip(mu, lo, hi), np.clip(fitted, lo, hi)
    sigma = calibrate_sigma(fitted, y, lo, hi, seed)
    return Oracle(family, users[keep], items, mu, sigma, lo, hi, float(np.sqrt(np.mean((fitted - y) ** 2))))


def calibrate_sigma(fitted: np.ndarray, observed: np.ndarray, lo: float, hi: float, seed: int) -> float:
    """Noise level at which rounded, clipped `fitted + sigma z` has the variance of `observed`.

    The variance is monotone in sigma over the range searched, so a bracketing root finder
    (scipy's brentq) with one fixed set of normal draws solves it; sigma 0 when the fitted values
    alone already vary as much as the observations.
    """
    from scipy.optimize import brentq

    z = rng(seed, "oracle-noise").standard_normal(len(fitted))
    target = float(np.var(observed))

    def excess(sigma: float) -> float:
        return float(np.var(np.clip(np.rint(fitted + sigma * z), lo, hi))) - target

    top = hi - lo
    if excess(0.0) >= 0.0:
        return 0.0
    if excess(top) <= 0.0:
        return float(top)
    return float(brentq(excess, 0.0, top, xtol=1e-4))


def _biases(n_users: int, n_items: int, ui: np.ndarray, ii: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Global mean and shrunk item then user biases (one pass of alternating shrunk means)."""
    g = float(y.mean())
    b_i = np.bincount(ii, y - g, n_items) / (np.bincount(ii, None, n_items) + _SHRINK)
    b_u = np.bincount(ui, y - g - b_i[ii], n_users) / (np.bincount(ui, None, n_users) + _SHRINK)
    return g, b_u, b_i


def _rowdots(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 500_000) -> np.ndarray:
    """a[rows[n]] . b[cols[n]] for every n, a chunk at a time (the gathered rows of 10M ratings at
    rank 16 would be 1.3 GB each)."""
    out = np.empty(len(rows))
    for start in range(0, len(rows), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + len(r)] = np.einsum("nk,nk->n", a[r], b[c])
    return out


class _FilledMatrix:
    """A users x items matrix X = A B^T + S held as a low-rank part and a sparse part, never dense.

    Why: the NMF oracle fits the rating matrix with its missing cells filled (first with the bias
    baseline, then with the previous fit), which is low rank, and its observed cells, which are
    sparse. Dense, that matrix is 6 GB at 10M ratings (70,000 users x 10,700 items) and the fit
    holds several; every product the fit needs is linear in the ratings this way."""

    def __init__(self, a: np.ndarray, b: np.ndarray, ui: np.ndarray, ii: np.ndarray, values: np.ndarray,
                 shape: tuple[int, int]):
        from scipy import sparse

        self.a, self.b, self.shape = a, b, shape
        self.s = sparse.csr_matrix((values, (ui, ii)), shape=shape)
        self.st = self.s.T.tocsr()

    @classmethod
    def observed_over(cls, a: np.ndarray, b: np.ndarray, ui: np.ndarray, ii: np.ndarray, y: np.ndarray,
                      shape: tuple[int, int]) -> "_FilledMatrix":
        """The observed ratings y at (ui, ii) and A B^T everywhere else."""
        return cls(a, b, ui, ii, y - _rowdots(a, b, ui, ii), shape)

    def times_t(self, h: np.ndarray) -> np.ndarray:
        """X H^T for H [k, items]."""
        return self.a @ (self.b.T @ h.T) + self.s @ h.T

    def t_times(self, w: np.ndarray) -> np.ndarray:
        """W^T X for W [users, k]."""
        return (w.T @ self.a) @ self.b.T + (self.st @ w).T

    def mean(self) -> float:
        return float((self.a.sum(axis=0) @ self.b.sum(axis=0) + self.s.sum()) / (self.shape[0] * self.shape[1]))

    def sq_norm(self) -> float:
        """||X||_F^2 = ||A B^T||^2 + 2 <A B^T, S> + ||S||^2."""
        s = self.s.tocoo()
        cross = float((s.data * _rowdots(self.a, self.b, s.row, s.col)).sum())
        return float(((self.a.T @ self.a) * (self.b.T @ self.b)).sum() + 2.0 * cross + (s.data ** 2).sum())


def _hals_nmf(x: _FilledMatrix, rank: int, seed: int, max_iter: int = 200, tol: float = 1e-4
              ) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative W [users, rank] and H [rank, items] minimising ||X - W H||_F by hierarchical
    alternating least squares (Cichocki and Phan 2009; scikit-learn's coordinate descent solver is
    the same update), from scikit-learn's random initialisation (|N(0, 1)| sqrt(mean(X) / rank)).

    Each sweep needs X only through X H^T and W^T X. Stops when the relative decrease of the
    objective over 10 sweeps is below tol, or after max_iter sweeps."""
    gen = rng(seed, "nmf-oracle")
    avg = np.sqrt(max(x.mean(), 0.0) / rank)
    w = avg * np.abs(gen.standard_normal((x.shape[0], rank)))
    h = avg * np.abs(gen.standard_normal((rank, x.shape[1])))
    norm, previous = x.sq_norm(), np.inf
    for sweep in range(1, max_iter + 1):
        xh, hh = x.times_t(h), h @ h.T
        for t in range(rank):
            w[:, t] = np.maximum(w[:, t] + (xh[:, t] - w @ hh[:, t]) / max(hh[t, t], 1e-12), 0.0)
        wx, ww = x.t_times(w), w.T @ w
        for t in range(rank):
            h[t] = np.maximum(h[t] + (wx[t] - ww[t] @ h) / max(ww[t, t], 1e-12), 0.0)
        if sweep % 10 == 0:     # wx and ww are still W's: only H moved since
            loss = norm - 2.0 * float((wx * h).sum()) + float((ww * (h @ h.T)).sum())
            if previous - loss < tol * max(previous, 1e-12):
                break
            previous = loss
    return w, h


def _nmf_factors(n_users: int, n_items: int, ui: np.ndarray, ii: np.ndarray, y: np.ndarray,
                 rank: int, seed: int, iterations: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """W [users, rank] and H [rank, items] of the EM-completed rating matrix: the missing cells start
    at the bias baseline and then take the previous fit's reconstruction W H; each EM step is a
    full NMF of the completed matrix (`_hals_nmf`). The utility of (u, i) is (W H)[u, i]."""
    g, b_u, b_i = _biases(n_users, n_items, ui, ii, y)
    a = np.column_stack([g + b_u, np.ones(n_users)])           # A B^T = g + b_u + b_i
    b = np.column_stack([np.ones(n_items), b_i])
    w, h = a, b.T
    for step in range(iterations):
        x = _FilledMatrix.observed_over(w, h.T, ui, ii, y, (n_users, n_items))
        w, h = _hals_nmf(x, rank, seed + step)
    return w, h


def _item_matrix(data: RatingData, items: np.ndarray) -> tuple[np.ndarray, list[bool], np.ndarray | None]:
    """Item feature columns (multi-hot for multi-label features), which are categorical, and the
    multi-hot genre block of the first multi-label feature (for the affinity encoding)."""
    tab = data.items.drop_duplicates("item_id").set_index("item_id").reindex(items)
    cols, cats, genre_block = [], [], None
    for spec in data.spec.item_features:
        if spec.name not in tab:
            continue
        col = tab[spec.name]
        if spec.kind == "multilabel":
            sets = [set(str(v).split(spec.separator)) - {""} if isinstance(v, str) else set() for v in col]
            labels = sorted(set().union(*sets))
            block = np.array([[lab in s for lab in labels] for s in sets], dtype=float)
            cols += list(block.T)
            cats += [False] * len(labels)
            genre_block = block if genre_block is None else genre_block
        elif spec.kind == "numeric":
            cols.append(pd.to_numeric(col, errors="coerce").to_numpy(float))
            cats.append(False)
        else:
            codes, uniques = pd.factorize(col.astype(str))
            if len(uniques) <= _MAX_CATEGORIES:
                cols.append(codes.astype(float))
                cats.append(True)
    mat = np.column_stack(cols) if cols else np.zeros((len(items), 0))
    return mat, cats, genre_block


def _user_matrix(data: RatingData, users: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    tab = data.users.drop_duplicates("user_id").set_index("user_id").reindex(users)
    cols, cats = [], []
    for spec in data.spec.user_attributes:
        if spec.name not in tab:
            continue
        if spec.kind == "numeric":
            cols.append(pd.to_numeric(tab[spec.name], errors="coerce").to_numpy(float))
            cats.append(False)
            continue
        codes, uniques = pd.factorize(tab[spec.name].astype(str))
        if len(uniques) <= _MAX_CATEGORIES:   # e.g. zip codes are too many to be a category
            cols.append(codes.astype(float))
            cats.append(True)
    return (np.column_stack(cols) if cols else np.zeros((len(users), 0))), cats


def _gbdt_utility(data: RatingData, users: np.ndarray, items: np.ndarray, ui: np.ndarray, ii: np.ndarray,
                  y: np.ndarray, seed: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(utilities of the `keep` user rows x all items, fitted values of the observed ratings)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    n_u, n_i = len(users), len(items)
    g, b_u, b_i = _biases(n_u, n_i, ui, ii, y)
    umat, ucat = _user_matrix(data, users)
    imat, icat, genres = _item_matrix(data, items)
    if genres is None:
        genres = np.ones((n_i, 1))
    # user x genre affinity: shrunk mean residual of the user's ratings of items of that genre
    resid = y - g - b_i[ii] - b_u[ui]
    share = genres / np.maximum(genres.sum(axis=1, keepdims=True), 1.0)
    num = np.zeros((n_u, genres.shape[1]))
    den = np.zeros((n_u, genres.shape[1]))
    np.add.at(num, ui, share[ii] * resid[:, None])
    np.add.at(den, ui, share[ii])
    affinity = num / (den + _SHRINK)
    log_count = np.log1p(np.bincount(ii, None, n_i))

    def features(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        aff = (affinity[u] * share[i]).sum(axis=1)
        return np.column_stack([umat[u], imat[i], b_u[u], b_i[i], aff, log_count[i]])

    cat_mask = np.array(ucat + icat + [False] * 4, dtype=bool)
    model = HistGradientBoostingRegressor(max_iter=50, learning_rate=0.2, max_leaf_nodes=31, early_stopping=False,
                                          categorical_features=cat_mask if cat_mask.any() else None,
                                          random_state=seed)
    fit = (slice(None) if len(y) <= GBDT_MAX_FIT
           else np.sort(rng(seed, "gbdt-fit").choice(len(y), GBDT_MAX_FIT, replace=False)))
    model.fit(features(ui[fit], ii[fit]), y[fit])
    out = np.empty((len(keep), n_i))
    block = max(1, 200_000 // max(n_i, 1))
    all_items = np.arange(n_i)
    for start in range(0, len(keep), block):
        rows = keep[start:start + block]
        out[start:start + len(rows)] = model.predict(features(np.repeat(rows, n_i), np.tile(all_items, len(rows)))).reshape(len(rows), n_i)
    fitted = np.empty(len(y))
    for start in range(0, len(y), 200_000):      # the feature matrix of every rating is GBs at 10M
        end = start + 200_000
        fitted[start:end] = model.predict(features(ui[start:end], ii[start:end]))
    return out, fitted
