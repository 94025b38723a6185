"""Encoders from raw attribute values to integer indices, each with an explicit unknown bucket.

Models never see raw strings: user attributes become one index per attribute, items become a row
of an item table (categorical and bucketed numeric features as indices, multi-label features as a
padded index list for mean-pooled embedding bags). Vocabularies are learned from training rows
only, so a value first seen at evaluation time maps to the unknown bucket instead of a fresh index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from metarec.data.schema import AttrSpec, DataSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: the classic models never need it
    import torch

UNKNOWN = 0  # categorical/numeric: index 0 is the unknown bucket
PAD = 0      # multi-label: index 0 pads a list, index 1 is unknown
ML_UNKNOWN = 1
ITEM_ID = "item_id"


def _as_str(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


@dataclass
class FeatureEncoder:
    """Vocabularies for user attributes and item features.

    `user_names`: user attributes fed to models, in order (sensitive ones removed when the
    fairness-through-unawareness ablation is on). `item_names`: single-valued item features;
    `item_multilabel`: multi-label item features. `vocab[name]` lists known values; the index of
    value v is vocab.index(v) + offset (1 for single-valued, 2 for multi-label).
    """

    spec: DataSpec
    user_names: list[str]
    item_names: list[str]
    item_multilabel: list[str]
    vocab: dict[str, list[str]] = field(default_factory=dict)
    item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    item_x: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    item_ml: dict[str, np.ndarray] = field(default_factory=dict)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, spec: DataSpec, users: pd.DataFrame, items: pd.DataFrame, train_users: Iterable[int],
            train_items: Iterable[int], *, drop_sensitive: bool = False, item_id_feature: bool = True,
            min_count: int = 1) -> "FeatureEncoder":
        """Learn vocabularies from the training users and items, then build the item table for
        every item (new items too: their features are side information known in advance)."""
        user_names = [a.name for a in spec.user_attributes if not (drop_sensitive and a.name in spec.sensitive)]
        single = [a.name for a in spec.item_features if a.kind != "multilabel"]
        multi = [a.name for a in spec.item_features if a.kind == "multilabel"]
        if item_id_feature:
            single = [ITEM_ID] + single
        enc = cls(spec=spec, user_names=user_names, item_names=single, item_multilabel=multi)
        tu = users[users["user_id"].isin(set(train_users))]
        ti = items[items["item_id"].isin(set(train_items))]
        for a in spec.user_attributes:
            if a.name in user_names:
                enc.vocab[a.name] = enc._learn(a, tu[a.name], min_count)
        for a in spec.item_features:
            enc.vocab[a.name] = enc._learn(a, ti[a.name], min_count)
        if item_id_feature:
            enc.vocab[ITEM_ID] = sorted({str(int(i)) for i in ti["item_id"]}, key=int)
        enc._build_item_table(items)
        return enc

    @staticmethod
    def _learn(a: AttrSpec, column: pd.Series, min_count: int) -> list[str]:
        if a.kind == "numeric":
            return list(a.bucket_labels())
        if a.kind == "multilabel":
            labels = column.dropna().astype(str).str.split(a.separator, regex=False).explode()
            counts = labels[labels != ""].value_counts()
        else:
            counts = column.dropna().astype(str).value_counts()
        return sorted(counts[counts >= min_count].index.tolist())

    # ---------------------------------------------------------------- encoding
    def _index(self, name: str, values: Sequence) -> np.ndarray:
        lookup = {v: i + 1 for i, v in enumerate(self.vocab[name])}
        return np.array([lookup.get(v, UNKNOWN) if v is not None else UNKNOWN for v in values], dtype=np.int64)

    def _single_values(self, a: AttrSpec | None, name: str, column: pd.Series) -> list[str | None]:
        if a is not None and a.kind == "numeric":
            return [_as_str(v) for v in a.bucketize(column)]
        if name == ITEM_ID:
            return [str(int(v)) for v in column]
        return [_as_str(v) for v in column]

    def _spec_of(self, name: str) -> AttrSpec | None:
        for a in (*self.spec.user_attributes, *self.spec.item_features):
            if a.name == name:
                return a
        return None

    def encode_users(self, attrs: pd.DataFrame | Sequence[Mapping[str, object]]) -> np.ndarray:
        """[n, len(user_names)] indices from raw attribute values (dicts or a users table)."""
        frame = attrs if isinstance(attrs, pd.DataFrame) else pd.DataFrame(list(attrs))
        cols = []
        for name in self.user_names:
            column = frame[name] if name in frame else pd.Series([None] * len(frame), dtype=object)
            cols.append(self._index(name, self._single_values(self._spec_of(name), name, column)))
        if not cols:
            return np.zeros((len(frame), 0), dtype=np.int64)
        return np.stack(cols, axis=1)

    def _build_item_table(self, items: pd.DataFrame) -> None:
        items = items.sort_values("item_id").reset_index(drop=True)
        self.item_ids = items["item_id"].to_numpy(dtype=np.int64)
        cols = [self._index(n, self._single_values(self._spec_of(n), n, items[n] if n != ITEM_ID else items["item_id"]))
                for n in self.item_names]
        self.item_x = np.stack(cols, axis=1) if cols else np.zeros((len(items), 0), dtype=np.int64)
        self.item_ml = {}
        for name in self.item_multilabel:
            a = self._spec_of(name)
            lookup = {v: i + 2 for i, v in enumerate(self.vocab[name])}
            rows = []
            for v in items[name]:
                s = _as_str(v)
                labels = [x for x in s.split(a.separator) if x] if s else []
                rows.append([lookup.get(x, ML_UNKNOWN) for x in labels] or [ML_UNKNOWN])
            width = max(len(r) for r in rows) if rows else 1
            table = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                table[i, : len(r)] = r
            self.item_ml[name] = table

    def item_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each item id in the item table; raises on an item the table does not hold."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos = np.clip(pos, 0, max(len(self.item_ids) - 1, 0))
        bad = self.item_ids[pos] != item_ids if len(self.item_ids) else np.ones(len(item_ids), bool)
        if np.any(bad):
            raise KeyError(f"item ids not in the item table: {item_ids[bad][:5].tolist()}")
        return pos

    # ---------------------------------------------------------------- sizes and tensors
    def user_cardinalities(self) -> list[int]:
        return [len(self.vocab[n]) + 1 for n in self.user_names]

    def item_cardinalities(self) -> list[int]:
        return [len(self.vocab[n]) + 1 for n in self.item_names]

    def multilabel_cardinalities(self) -> list[int]:
        return [len(self.vocab[n]) + 2 for n in self.item_multilabel]

    def item_tensors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        import torch

        return torch.from_numpy(self.item_x), [torch.from_numpy(self.item_ml[n]) for n in self.item_multilabel]

    # ---------------------------------------------------------------- persistence (JSON, never pickle)
    def to_json(self) -> str:
        return json.dumps({
            "spec": self.spec.to_dict(), "user_names": self.user_names, "item_names": self.item_names,
            "item_multilabel": self.item_multilabel, "vocab": self.vocab,
            "item_ids": self.item_ids.tolist(), "item_x": self.item_x.tolist(),
            "item_ml": {k: v.tolist() for k, v in self.item_ml.items()},
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FeatureEncoder":
        d = json.loads(text)
        enc = cls(spec=DataSpec.from_dict(d["spec"]), user_names=d["user_names"], item_names=d["item_names"],
                  item_multilabel=d["item_multilabel"], vocab=d["vocab"])
        enc.item_ids = np.asarray(d["item_ids"], dtype=np.int64)
        enc.item_x = np.asarray(d["item_x"], dtype=np.int64).reshape(len(enc.item_ids), len(enc.item_names))
        enc.item_ml = {k: np.asarray(v, dtype=np.int64) for k, v in d["item_ml"].items()}
        return enc
