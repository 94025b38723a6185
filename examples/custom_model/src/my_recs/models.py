"""AttributeFactors: a small factorisation model a team might ship, written against the audit's
predict interface only (it imports nothing from metarec-audit).

rating(u, i) = mu + b_i + <p(attrs_u), q_i> + offset_u

- b_i, q_i: item bias and item factors, learned by alternating ridge regressions on the training
  ratings (numpy only);
- p(attrs_u): user factors from the user's attributes, a linear map of their one-hot encoding, so a
  brand-new user has factors before rating anything (the cold-start part);
- offset_u: at prediction time, the shrunk mean residual of the user's support ratings (the
  "adaptation" to a few ratings).

The audit hands `fit` its training TaskSet (`.frame` with user_id, item_id, rating, and `.users`
with one row of attributes per user) and `predict` a list of tasks with `user_attrs`,
`support_items`, `support_ratings` and `candidates`. Persistence is JSON (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class AttributeFactors:
    """Attribute-conditioned matrix factorisation with a support-set offset."""

    description = ("Example team model: item biases and factors fitted by alternating ridge regressions, "
                   "user factors from the user's attributes, plus a shrunk support-set offset.")

    def __init__(self, dim: int = 8, reg: float = 5.0, n_iter: int = 10, shrink: float = 5.0,
                 rating_min: float = 1.0, rating_max: float = 5.0, seed: int = 0) -> None:
        self.dim, self.reg, self.n_iter, self.shrink = dim, reg, n_iter, shrink
        self.rating_min, self.rating_max, self.seed = rating_min, rating_max, seed

    # scikit-learn style: constructor arguments are the parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("dim", "reg", "n_iter", "shrink", "rating_min", "rating_max", "seed")}

    def set_params(self, **params: Any) -> "AttributeFactors":
        for k, v in params.items():
            setattr(self, k, v)
        return self

    # ---------------------------------------------------------------------------------- features
    def _encode(self, attrs: dict[str, Any]) -> np.ndarray:
        x = np.zeros(len(self.columns_) + 1)
        x[-1] = 1.0   # intercept: the mean user
        for name, value in attrs.items():
            j = self.columns_.get(f"{name}={value}")
            if j is not None:
                x[j] = 1.0
        return x

    # ---------------------------------------------------------------------------------- training
    def fit(self, train, val=None) -> "AttributeFactors":
        if self.dim < 1 or self.reg <= 0 or self.n_iter < 1:
            raise ValueError(f"AttributeFactors: dim >= 1, reg > 0 and n_iter >= 1 are required, got "
                             f"dim={self.dim}, reg={self.reg}, n_iter={self.n_iter}")
        frame = train.frame
        users = train.users.drop_duplicates("user_id").set_index("user_id")
        attr_cols = [c for c in users.columns]
        self.columns_ = {}
        for c in attr_cols:
            for v in sorted(users[c].astype(str).unique()):
                self.columns_[f"{c}={v}"] = len(self.columns_)
        uids = frame["user_id"].to_numpy()
        item_ids = np.unique(frame["item_id"].to_numpy())
        self.items_ = {str(i): k for k, i in enumerate(item_ids.tolist())}
        u_index = {u: k for k, u in enumerate(np.unique(uids).tolist())}
        X = np.stack([self._encode({c: str(users.at[u, c]) for c in attr_cols}) for u in u_index])
        ru = np.array([u_index[u] for u in uids.tolist()])
        ri = np.array([self.items_[str(i)] for i in frame["item_id"].tolist()])
        r = frame["rating"].to_numpy(float)
        self.mu_ = float(r.mean())
        rng = np.random.default_rng(self.seed)
        n_items, d = len(self.items_), self.dim
        W = rng.normal(0, 0.1, (X.shape[1], d))          # attributes -> user factors
        Q = rng.normal(0, 0.1, (n_items, d))
        b = np.zeros(n_items)
        by_item = np.split(np.argsort(ri, kind="stable"), np.cumsum(np.bincount(ri, minlength=n_items))[:-1])
        for _ in range(self.n_iter):
            P = X @ W
            # items: ridge on [P_u, 1] for each item's ratings
            A = np.hstack([P[ru], np.ones((len(r), 1))])
            for i, rows in enumerate(by_item):
                Ai, yi = A[rows], r[rows] - self.mu_
                sol = np.linalg.solve(Ai.T @ Ai + self.reg * np.eye(d + 1), Ai.T @ yi)
                Q[i], b[i] = sol[:d], sol[d]
            # attribute map: ridge of residual on kron(X_u, Q_i)
            F = np.einsum("na,nd->nad", X[ru], Q[ri]).reshape(len(r), -1)
            y = r - self.mu_ - b[ri]
            W = np.linalg.solve(F.T @ F + self.reg * np.eye(F.shape[1]), F.T @ y).reshape(X.shape[1], d)
        self.W_, self.Q_, self.b_ = W, Q, b
        return self

    def _raw(self, attrs: dict[str, Any], items: np.ndarray) -> np.ndarray:
        p = self._encode({k: str(v) for k, v in attrs.items()}) @ self.W_
        idx = np.array([self.items_.get(str(i), -1) for i in items.tolist()], dtype=int)
        known = idx >= 0
        out = np.full(len(items), self.mu_)
        out[known] += self.b_[idx[known]] + self.Q_[idx[known]] @ p
        return out

    def predict(self, tasks: Sequence[Any]) -> list[np.ndarray]:
        out = []
        for t in tasks:
            offset = 0.0
            if len(t.support_items):
                resid = np.asarray(t.support_ratings, float) - self._raw(t.user_attrs, np.asarray(t.support_items))
                offset = resid.sum() / (len(resid) + self.shrink)
            pred = self._raw(t.user_attrs, np.asarray(t.candidates)) + offset
            out.append(np.clip(pred, self.rating_min, self.rating_max))
        return out

    # ------------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "attribute_factors.json").write_text(json.dumps({
            "params": self.get_params(), "mu": self.mu_, "columns": self.columns_, "items": self.items_,
            "W": self.W_.tolist(), "Q": self.Q_.tolist(), "b": self.b_.tolist()}))

    @classmethod
    def load(cls, directory: str | Path, train=None) -> "AttributeFactors":
        doc = json.loads((Path(directory) / "attribute_factors.json").read_text())
        model = cls(**doc["params"])
        model.mu_, model.columns_, model.items_ = doc["mu"], doc["columns"], doc["items"]
        model.W_, model.Q_, model.b_ = (np.asarray(doc[k]) for k in ("W", "Q", "b"))
        return model
