"""User strata for group fairness: gender, age bucket, occupation, activity tertile, zip region and
named intersections ("gender x age").

Small groups are merged into "other" (and listed in ``Strata.merged``), never dropped: a dropped
group would silently vanish from the audit. Every table carries group counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

__all__ = [
    "AGE_LABELS",
    "INTERSECTION_SEP",
    "Strata",
    "age_bucket",
    "zip_region",
    "activity_tertile",
    "merge_small_groups",
    "derive_strata",
]

# MovieLens-1M age codes are lower bounds: 1 (<18), 18, 25, 35, 45, 50, 56. Applying them as
# thresholds to real ages (ML-100K) gives the same buckets.
_AGE_EDGES = [18, 25, 35, 45, 50, 56]
AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
INTERSECTION_SEP = " x "
_VALUE_SEP = " | "
UNKNOWN = "unknown"


def age_bucket(age) -> pd.Series:
    """Map ages (years) to the MovieLens-1M buckets; missing or non-numeric -> "unknown"."""
    a = pd.to_numeric(pd.Series(age), errors="coerce")
    idx = np.searchsorted(_AGE_EDGES, a.fillna(-1).to_numpy(), side="right")
    lab = np.asarray(AGE_LABELS, dtype=object)[idx]
    return pd.Series(np.where(a.isna(), UNKNOWN, lab), index=a.index, dtype=object)


def zip_region(zips) -> pd.Series:
    """First digit of a US zip code (the postal region); non-numeric -> "other", missing -> "unknown".

    ML-100K holds a few Canadian postal codes (letters first), which map to "other".
    """
    s = pd.Series(zips)

    def one(z) -> str:
        if z is None or (isinstance(z, float) and np.isnan(z)):
            return UNKNOWN
        z = str(z).strip()
        if not z:
            return UNKNOWN
        return z[0] if z[0].isdigit() else "other"

    return s.map(one).astype(object)


def activity_tertile(user_ids: Iterable, counts: pd.Series) -> pd.Series:
    """Activity tertile ("low", "mid", "high") by number of training + support ratings.

    Users absent from ``counts`` have 0 ratings. Tertiles are cut on the rank (ties by user
    order), so equal counts never produce empty or duplicated bins.
    """
    uid = pd.Series(list(user_ids))
    c = uid.map(counts).fillna(0).astype(float)
    n = len(c)
    if n == 0:
        return pd.Series([], dtype=object)
    r = c.rank(method="first").to_numpy() - 1.0
    lab = np.asarray(["low", "mid", "high"], dtype=object)[np.minimum((3 * r / n).astype(int), 2)]
    return pd.Series(lab, index=uid.index, dtype=object)


def merge_small_groups(
    col: pd.Series, min_size: int, other: str = "other"
) -> tuple[pd.Series, list[str]]:
    """Fold groups with fewer than ``min_size`` members into ``other``; return the folded names.

    If a real group is already called ``other`` (ML-100K occupation), the small groups join it;
    the returned list says which groups were folded in, so the report can flag it.
    """
    vc = col.value_counts()
    small = sorted(str(g) for g in vc[vc < min_size].index if str(g) != other)
    if not small:
        return col.astype(object), []
    out = col.astype(object).where(~col.astype(str).isin(small), other)
    return out, small


@dataclass
class Strata:
    """Strata columns per user plus what was merged.

    ``frame``: user_id + one column per attribute (strings). ``merged``: attribute -> list of
    original group labels folded into "other". ``other_label``: the label they were folded into.
    """

    frame: pd.DataFrame
    merged: dict = field(default_factory=dict)
    min_size: int = 1
    other_label: str = "other"

    @property
    def attributes(self) -> list[str]:
        return [c for c in self.frame.columns if c != "user_id"]

    def is_merged(self, attribute: str, group: str) -> bool:
        """True when ``group`` of ``attribute`` holds folded small groups."""
        return bool(self.merged.get(attribute)) and str(group) == self.other_label

    def counts(self) -> pd.DataFrame:
        """Group sizes: [attribute, group, n, merged]."""
        rows = []
        for a in self.attributes:
            for g, n in self.frame[a].value_counts().sort_index().items():
                rows.append({"attribute": a, "group": g, "n": int(n),
                             "merged": self.is_merged(a, g)})
        return pd.DataFrame(rows, columns=["attribute", "group", "n", "merged"])


_BASE = {
    "gender": lambda u, c: u["gender"].fillna(UNKNOWN).astype(str),
    "age": lambda u, c: age_bucket(u["age"]),
    "occupation": lambda u, c: u["occupation"].fillna(UNKNOWN).astype(str),
    "zip_region": lambda u, c: zip_region(u["zip"]),
    "activity": lambda u, c: activity_tertile(u["user_id"], c),
}


def derive_strata(
    users: pd.DataFrame,
    attributes: Iterable[str] = ("gender", "age", "occupation", "activity", "zip_region"),
    *,
    counts: pd.Series | None = None,
    min_size: int = 20,
    other_label: str = "other",
) -> Strata:
    """Derive strata columns for the given attribute names.

    Base names: gender, age (bucketed), occupation, activity (tertile; needs ``counts`` = number
    of training + support ratings per user_id), zip_region (also accepted: "zip"). An
    intersection is named "a x b" and gets values "A | B" built from the unmerged base values.
    Any other name is taken as a categorical users column as is. Groups under ``min_size`` are
    merged into ``other_label`` and listed in ``merged``.
    """
    attributes = list(attributes)
    u = users.reset_index(drop=True)
    cache: dict[str, pd.Series] = {}

    def base(name: str) -> pd.Series:
        name = "zip_region" if name == "zip" else name
        if name in cache:
            return cache[name]
        if name == "activity" and counts is None:
            raise ValueError("the activity stratum needs per-user rating counts (counts=...).")
        if name in _BASE and (name == "activity" or {"zip_region": "zip"}.get(name, name) in u):
            col = _BASE[name](u, counts)
        elif name in u.columns:
            col = u[name].fillna(UNKNOWN).astype(str)
        else:
            raise ValueError(f"unknown stratum {name!r}: users have columns {list(u.columns)}.")
        cache[name] = col.reset_index(drop=True).astype(object)
        return cache[name]

    frame = pd.DataFrame({"user_id": u["user_id"].to_numpy()})
    merged: dict[str, list[str]] = {}
    for a in attributes:
        parts = [p.strip() for p in a.split(INTERSECTION_SEP)]
        if len(parts) > 1:
            cols = [base(p) for p in parts]
            col = cols[0].astype(str)
            for c in cols[1:]:
                col = col + _VALUE_SEP + c.astype(str)
            name = INTERSECTION_SEP.join(parts)
        else:
            col = base(a)
            name = "zip_region" if a == "zip" else a
        col, small = merge_small_groups(col, min_size, other_label)
        frame[name] = col.to_numpy()
        if small:
            merged[name] = small
    return Strata(frame=frame, merged=merged, min_size=min_size, other_label=other_label)
