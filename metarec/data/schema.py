"""The in-memory form every data source produces, and the declared kind of each attribute.

Three tables, as in CONTRACTS.md's bring-your-own layout:
- ratings: user_id (int64 code), item_id (int64 code), rating (float64), timestamp (int64 seconds)
- users: user_id plus one column per user attribute
- items: item_id plus one column per item feature; multi-label values are one string joined by the
  attribute's separator (e.g. "Action|Comedy"); `release_date` (datetime64, may be NaT) when known;
  `title` when known (never a model input).
user_id and item_id are int64 codes; `ids["user_id"]` / `ids["item_id"]` (metarec.data.ids.IdMap)
give back the ids as the data owner wrote them (the identity when those are integers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Literal

import pandas as pd

from metarec.data.ids import IdMap

Kind = Literal["categorical", "numeric", "multilabel"]

# MovieLens-1M's age buckets (MeLU's input): <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
ML1M_AGE_EDGES: tuple[float, ...] = (18, 25, 35, 45, 50, 56)
ML1M_AGE_LABELS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


@dataclass(frozen=True)
class AttrSpec:
    """How one column is read and encoded.

    numeric attributes are bucketed at `edges` (left-closed: value v falls in bucket i where
    edges[i-1] <= v < edges[i]); `labels` names the len(edges)+1 buckets.
    """

    name: str
    kind: Kind
    edges: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()
    separator: str = "|"

    def __post_init__(self) -> None:
        if self.kind not in ("categorical", "numeric", "multilabel"):
            raise ValueError(f"attribute {self.name!r}: kind must be categorical, numeric or multilabel, got {self.kind!r}")
        if self.kind == "numeric" and self.labels and len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"attribute {self.name!r}: {len(self.edges)} bucket edges need {len(self.edges) + 1} labels, got {len(self.labels)}")

    def bucket_labels(self) -> tuple[str, ...]:
        if self.labels:
            return self.labels
        e = self.edges
        if not e:
            return ("all",)
        out = [f"<{e[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(e[:-1], e[1:])] + [f">={e[-1]:g}"]
        return tuple(out)

    def bucketize(self, values: pd.Series) -> pd.Series:
        """Numeric values to bucket labels (missing stays missing)."""
        import numpy as np

        labels = np.array(self.bucket_labels(), dtype=object)
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        idx = np.searchsorted(np.asarray(self.edges, dtype=float), v, side="right")
        out = labels[np.clip(idx, 0, len(labels) - 1)]
        out = pd.Series(out, index=values.index, dtype=object)
        out[np.isnan(v)] = None
        return out


@dataclass(frozen=True)
class DataSpec:
    """The declared schema. `derived`: user columns a source derives from its raw attributes for the
    audit's strata only (e.g. MovieLens's zip region); they are never model inputs."""

    user_attributes: tuple[AttrSpec, ...]
    item_features: tuple[AttrSpec, ...]
    sensitive: tuple[str, ...]
    rating_min: float = 1.0
    rating_max: float = 5.0
    derived: tuple[AttrSpec, ...] = ()

    def user_attr(self, name: str) -> AttrSpec:
        for a in self.user_attributes:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        conv = lambda items: tuple(AttrSpec(**{**a, "edges": tuple(a.get("edges", ())), "labels": tuple(a.get("labels", ()))}) for a in items)
        return cls(user_attributes=conv(d["user_attributes"]), item_features=conv(d["item_features"]),
                   sensitive=tuple(d["sensitive"]), rating_min=float(d["rating_min"]), rating_max=float(d["rating_max"]),
                   derived=conv(d.get("derived", ())))


MOVIELENS_SPEC = DataSpec(
    user_attributes=(
        AttrSpec("gender", "categorical"),
        AttrSpec("age", "numeric", edges=ML1M_AGE_EDGES, labels=ML1M_AGE_LABELS),
        AttrSpec("occupation", "categorical"),
        AttrSpec("zip", "categorical"),
    ),
    item_features=(
        AttrSpec("genres", "multilabel", separator="|"),
        AttrSpec("release_year", "numeric", edges=(1950, 1970, 1980, 1990, 1994, 1996, 1997, 1998)),
    ),
    sensitive=("gender", "age", "occupation"),
)


@dataclass
class RatingData:
    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    spec: DataSpec
    source: str = ""
    provenance: dict = field(default_factory=dict)
    ids: dict[str, IdMap] = field(default_factory=dict)

    def id_map(self, key: str) -> IdMap:
        """The map of "user_id" or "item_id"; the identity over the codes present when none was built."""
        if key not in self.ids:
            frame = self.users if key == "user_id" else self.items
            self.ids[key] = IdMap.identity(frame[key])
        return self.ids[key]
