"""User strata for group fairness, all from the dataset's declared schema (metarec.data.schema).

A stratum is one of:
- a declared user attribute (data.schema / the source's spec): numeric ones by their declared
  bucket `edges` and `labels`, the others by value;
- a column the source declares as derived for the audit (`DataSpec.derived`, e.g. a region the
  MovieLens loader derives from its postal codes);
- `activity`, the one stratum that makes sense for any data: the tertile of each user's rating count;
- an intersection of those, named "a x b" with values "A | B".

Default `strata.attributes` (when params leave it empty): the sensitive attributes, activity, then
the derived ones; default intersections: the first two sensitive attributes. Every name is checked
against the schema by `plan_strata` before any work (one ConfigError sentence naming the field).

Small groups are merged into "other" (and listed in ``Strata.merged``), never dropped: a dropped
group would silently vanish from the audit. Every table carries group counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from metarec.data.schema import AttrSpec, DataSpec, RatingData
from metarec.errors import ConfigError

__all__ = [
    "ACTIVITY",
    "INTERSECTION_SEP",
    "Strata",
    "StrataPlan",
    "activity_tertile",
    "available_strata",
    "derive_strata",
    "merge_small_groups",
    "plan_strata",
    "strata_for",
]

ACTIVITY = "activity"
INTERSECTION_SEP = " x "
_VALUE_SEP = " | "
UNKNOWN = "unknown"


def available_strata(spec: DataSpec) -> list[str]:
    """Every name `strata.attributes` may use: declared user attributes, derived columns, activity."""
    names = [a.name for a in (*spec.user_attributes, *spec.derived)]
    return names + ([ACTIVITY] if ACTIVITY not in names else [])


@dataclass(frozen=True)
class StrataPlan:
    """The strata an audit reports, resolved against the schema (see `plan_strata`)."""

    attributes: tuple[str, ...]
    intersections: tuple[tuple[str, ...], ...]
    min_group_size: int

    @property
    def names(self) -> list[str]:
        """Stratum column names: the attributes, then each intersection as "a x b"."""
        return list(self.attributes) + [INTERSECTION_SEP.join(p) for p in self.intersections]


def _name_list(value: object, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"params.yaml: {where} is {value!r}; expected a list of attribute names")
    return list(value)


def plan_strata(cfg: Mapping | None, spec: DataSpec) -> StrataPlan:
    """Resolve params `strata` against the declared schema, defaults included.

    Why here and early: a name the data does not have used to surface only after every model was
    trained; the prepare stage calls this, so a bad name stops the run before any work.
    """
    cfg = cfg or {}
    known = available_strata(spec)

    def check(name: str, where: str) -> str:
        if name not in known:
            raise ConfigError(f"params.yaml: {where} names {name!r}, which is not a stratum of this dataset; "
                              f"expected one of {', '.join(known)}")
        return name

    raw = cfg.get("attributes")
    if raw is None:
        attributes = [*spec.sensitive, ACTIVITY, *(a.name for a in spec.derived)]
    else:
        attributes = [check(a, "strata.attributes") for a in _name_list(raw, "strata.attributes")]
    raw = cfg.get("intersections")
    if raw is None:
        pairs = [list(spec.sensitive[:2])] if len(spec.sensitive) >= 2 else []
    elif not isinstance(raw, (list, tuple)):
        raise ConfigError(f"params.yaml: strata.intersections is {raw!r}; expected a list of attribute lists "
                          f"such as [[{known[0]}, {known[-1]}]]")
    else:
        pairs = []
        for entry in raw:
            parts = _name_list(entry, "strata.intersections entry")
            if len(set(parts)) < 2:
                raise ConfigError(f"params.yaml: strata.intersections entry {parts} has fewer than two distinct "
                                  f"attributes; expected two or more")
            pairs.append([check(a, f"strata.intersections entry {parts}") for a in parts])
    size = cfg.get("min_group_size", 10)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"params.yaml: strata.min_group_size is {size!r}; expected a positive integer")
    return StrataPlan(tuple(attributes), tuple(tuple(p) for p in pairs), size)


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

    If a real group is already called ``other`` (as in some category lists), the small groups join it;
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


def _stratum_spec(spec: DataSpec | None, name: str) -> AttrSpec | None:
    if spec is None:
        return None
    for a in (*spec.user_attributes, *spec.derived):
        if a.name == name:
            return a
    return None


def derive_strata(
    users: pd.DataFrame,
    attributes: Iterable[str],
    *,
    spec: DataSpec | None = None,
    counts: pd.Series | None = None,
    min_size: int = 20,
    other_label: str = "other",
) -> Strata:
    """Strata columns for the given names (attributes and "a x b" intersections).

    Each name is a users column labelled as `spec` declares it (numeric: its bucket labels; else
    its value; missing -> "unknown"), or `activity` (needs ``counts`` = ratings per user_id). Without
    a spec every column is taken by value. An intersection gets values "A | B" built from the
    unmerged values. Groups under ``min_size`` are merged into ``other_label`` and listed in ``merged``.
    """
    attributes = list(attributes)
    u = users.reset_index(drop=True)
    cache: dict[str, pd.Series] = {}

    def base(name: str) -> pd.Series:
        if name in cache:
            return cache[name]
        declared = _stratum_spec(spec, name)
        if name in u.columns:
            raw = u[name]
            col = declared.bucketize(raw) if declared is not None and declared.kind == "numeric" else raw
            col = col.astype(object).where(col.notna(), UNKNOWN).astype(str)
        elif name == ACTIVITY:
            if counts is None:
                raise ValueError("the activity stratum needs per-user rating counts (counts=...).")
            col = activity_tertile(u["user_id"], counts)
        else:
            raise ValueError(f"unknown stratum {name!r}: users have columns {list(u.columns)}.")
        cache[name] = col.reset_index(drop=True).astype(object)
        return cache[name]

    frame = pd.DataFrame({"user_id": u["user_id"].to_numpy()})
    merged: dict[str, list[str]] = {}
    for a in attributes:
        parts = [p.strip() for p in a.split(INTERSECTION_SEP)]
        col = base(parts[0]).astype(str)
        for p in parts[1:]:
            col = col + _VALUE_SEP + base(p).astype(str)
        name = INTERSECTION_SEP.join(parts)
        col, small = merge_small_groups(col, min_size, other_label)
        frame[name] = col.to_numpy()
        if small:
            merged[name] = small
    return Strata(frame=frame, merged=merged, min_size=min_size, other_label=other_label)


def strata_for(data: RatingData, cfg: Mapping | None) -> Strata:
    """Strata columns per user from params `strata`, resolved against the data's declared schema
    (`plan_strata`: defaults, and one clear error for a name the data lacks).

    Activity is the user's number of ratings in the dataset (only a label, never a model input).
    """
    plan = plan_strata(cfg, data.spec)
    counts = data.ratings.groupby("user_id").size()
    return derive_strata(data.users, plan.names, spec=data.spec, counts=counts, min_size=plan.min_group_size)
