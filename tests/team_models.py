"""Model classes a team might bring, good and broken, for tests/test_external_models.py.

They import nothing from metarec-audit: the audit must work with any class that has predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Pretrained:
    """A shipped model with no fit: scores every candidate by a fixed table."""

    def __init__(self, base: float = 3.5) -> None:
        self.base = base

    def predict(self, tasks):
        return [np.clip(self.base + 0.01 * (np.asarray(t.candidates) % 7), 1, 5) for t in tasks]


class ItemMeans:
    """fit learns item means from the training ratings; no save/load (refitted when needed)."""

    def __init__(self, shrink: float = 2.0, seed: int = 0) -> None:
        self.shrink, self.seed = shrink, seed

    def fit(self, train, val=None):
        f = train.frame
        self.mu_ = float(f["rating"].mean())
        g = f.groupby("item_id")["rating"].agg(["sum", "count"])
        self.means_ = ((g["sum"] + self.shrink * self.mu_) / (g["count"] + self.shrink)).to_dict()
        return self

    def predict(self, tasks):
        return [np.array([self.means_.get(i, self.mu_) for i in t.candidates.tolist()]) for t in tasks]


class SavedItemMeans(ItemMeans):
    """The same, with JSON persistence."""

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "m.json").write_text(json.dumps({"mu": self.mu_, "means": {str(k): v for k, v in self.means_.items()}}))

    @classmethod
    def load(cls, directory):
        doc = json.loads((Path(directory) / "m.json").read_text())
        m = cls()
        m.mu_, m.means_ = doc["mu"], {int(k): v for k, v in doc["means"].items()}
        return m


class WrongLength(Pretrained):
    def predict(self, tasks):
        return [np.full(len(t.candidates) - 1, 3.0) for t in tasks]


class Missing(Pretrained):
    def predict(self, tasks):
        return [np.full(len(t.candidates), 3.0) for t in tasks][:-1]


class NaNs(Pretrained):
    def predict(self, tasks):
        return [np.full(len(t.candidates), np.nan) for t in tasks]


class OffScale(Pretrained):
    def predict(self, tasks):
        return [np.full(len(t.candidates), 9.5) for t in tasks]


class NoPredict:
    def fit(self, train, val=None):
        return self


class Echo(Pretrained):
    """Records what it was asked (ids as the model sees them)."""

    seen: list = []

    def predict(self, tasks):
        Echo.seen = [(t.user_id, list(t.support_items), list(t.candidates)) for t in tasks]
        return [np.full(len(t.candidates), 3.0) for t in tasks]
