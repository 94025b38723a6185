"""Checks every data source passes before anything is written.

Each source parses its files into a RatingData whose frames keep the 0-based position of each data
row as their index, so that a failing check can name the file, the column and the 1-based data row
(or the id) and say what was expected. The audit is only meaningful on data whose ids, scales and
sensitive groups are sound, so every problem is a DataError rather than a silent repair; the one
repair on offer (duplicate pairs, policy `keep_latest`) is opt-in and logged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping

import numpy as np
import pandas as pd

from metarec.data.ids import IdMap, read_ids
from metarec.data.schema import DataSpec, RatingData
from metarec.errors import ConfigError, DataError

DUPLICATE_POLICIES = ("error", "keep_latest")
DEFAULT_NAMES = {"ratings": "interactions", "users": "users", "items": "items"}


# Rows formatted per block of the checksum: the text of a block is a few hundred MB at most, where
# the whole table's (fixed-width strings for four columns) took 5 GB at 10M ratings.
CHECKSUM_BLOCK = 1 << 19


def canonical_checksum(ratings: pd.DataFrame) -> str:
    """SHA-256 of the ratings in a form that does not depend on file layout or row order.

    Sorted by (user_id, item_id), one line f"{user_id}\\t{item_id}\\t{int(rating)}\\t{int(timestamp)}\\n"
    per rating. Two sources that serve the same ratings (GroupLens files, the RecBole copy) give the
    same digest, which is what lets the pipeline pin one value for MovieLens-100K. The lines are
    hashed in blocks of `CHECKSUM_BLOCK` rows (the same bytes in the same order, so the same digest)
    to keep memory bounded.
    """
    r = ratings.sort_values(["user_id", "item_id"], kind="stable")
    cols = (r["user_id"].to_numpy().astype(np.int64), r["item_id"].to_numpy().astype(np.int64),
            np.trunc(r["rating"].to_numpy(dtype=float)).astype(np.int64), r["timestamp"].to_numpy().astype(np.int64))
    digest = hashlib.sha256()
    for start in range(0, len(r), CHECKSUM_BLOCK):
        user, item, rating, ts = (c[start:start + CHECKSUM_BLOCK].astype(str) for c in cols)
        lines = user.astype(object) + "\t" + item + "\t" + rating + "\t" + ts + "\n"
        digest.update("".join(lines.tolist()).encode("ascii"))
    return digest.hexdigest()


def decode_text(data: bytes, file: str, encoding: str = "utf-8") -> str:
    """Decode a file's bytes, naming the byte offset of the first bad byte.

    A mis-encoded file would otherwise surface later as garbled categories or a parse error far
    from its cause.
    """
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file}: not valid {encoding.upper()} text at byte offset {exc.start} "
            f"(byte 0x{data[exc.start]:02x}); expected a {encoding.upper()}-encoded file") from None
    return text[1:] if text.startswith("\ufeff") else text


def split_lines(text: str, sep: str, n_fields: int, file: str, columns: list[str]) -> pd.DataFrame:
    """Split delimited text with no header into string columns, checking the field count per row."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = [line.split(sep) for line in lines]
    for i, row in enumerate(rows):
        if len(row) != n_fields:
            raise DataError(f"{file}: data row {i + 1} has {len(row)} fields separated by {sep!r}; "
                            f"expected {n_fields} ({', '.join(columns)})")
    frame = pd.DataFrame(rows, columns=columns, dtype=object) if rows else pd.DataFrame(columns=columns, dtype=object)
    return frame


def require_columns(frame: pd.DataFrame, columns: Collection[str], file: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{file}: missing column {missing[0]!r}; expected columns "
                        f"{', '.join(map(repr, columns))} (found {', '.join(map(repr, frame.columns))})")


def _blank(series: pd.Series) -> np.ndarray:
    s = series.astype(object)
    return (s.isna() | s.map(lambda v: isinstance(v, str) and not v.strip())).to_numpy(dtype=bool)


def coerce_int(series: pd.Series, file: str, column: str, what: str = "an integer id") -> pd.Series:
    """Strings/numbers to int64; the first empty or non-integer value is reported by data row."""
    blank = _blank(series)
    if blank.any():
        row = int(series.index[np.argmax(blank)]) + 1
        raise DataError(f"{file}: column {column!r}, data row {row} is empty; expected {what}")
    num = pd.to_numeric(series.astype(object).map(lambda v: v.strip() if isinstance(v, str) else v), errors="coerce")
    values = num.to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataError(f"{file}: column {column!r}, data row {int(series.index[pos]) + 1} has "
                        f"{series.iloc[pos]!r}; expected {what}")
    return pd.Series(values.astype(np.int64), index=series.index, name=series.name)


def coerce_float(series: pd.Series, file: str, column: str, what: str = "a number",
                 allow_missing: bool = False) -> pd.Series:
    blank = _blank(series)
    if blank.any() and not allow_missing:
        row = int(series.index[np.argmax(blank)]) + 1
        raise DataError(f"{file}: column {column!r}, data row {row} is empty; expected {what}")
    num = pd.to_numeric(series.astype(object).map(lambda v: v.strip() if isinstance(v, str) else v), errors="coerce")
    values = num.to_numpy(dtype=float)
    bad = (np.isnan(values) & ~blank) | np.isinf(values)
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataError(f"{file}: column {column!r}, data row {int(series.index[pos]) + 1} has "
                        f"{series.iloc[pos]!r}; expected {what}")
    return pd.Series(values, index=series.index, name=series.name)


def coerce_rating(series: pd.Series, file: str, scale: str) -> pd.Series:
    """Ratings to float64; a boolean column (a parquet `bool`) is refused rather than read as 0/1,
    since True/False is a like/dislike signal on a different scale than the declared one."""
    is_bool = series.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
    if pd.api.types.is_bool_dtype(series.dtype) or is_bool.any():
        pos = int(np.argmax(is_bool)) if is_bool.any() else 0
        raise DataError(f"{file}: column 'rating', data row {int(series.index[pos]) + 1} has "
                        f"{bool(series.iloc[pos])} (a boolean); expected {scale}")
    return coerce_float(series, file, "rating", scale)


def coerce_timestamp(series: pd.Series, file: str) -> pd.Series:
    """Timestamps to int64 seconds since the epoch.

    A datetime column (parquet `timestamp[ms|us|ns]`, tz-aware or not) is converted by its unit,
    never by reading its raw integer as seconds; integer columns are taken as seconds.
    """
    what = "an integer timestamp (seconds since 1970-01-01) or a datetime"
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        missing = series.isna().to_numpy()
        if missing.any():
            pos = int(np.argmax(missing))
            raise DataError(f"{file}: column 'timestamp', data row {int(series.index[pos]) + 1} is empty; "
                            f"expected {what}")
        seconds = (series - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
        return pd.Series(seconds.to_numpy(dtype=np.int64), index=series.index, name=series.name)
    return coerce_int(series, file, "timestamp", what)


def group_labels(data_users: pd.DataFrame, spec: DataSpec, name: str) -> pd.Series:
    """Each user's group for one attribute: the bucket for numeric attributes, else the value."""
    attr = spec.user_attr(name)
    col = data_users[name]
    if attr.kind == "numeric":
        return attr.bucketize(col)
    return col.astype(object)


def validate(data: RatingData, *, duplicates: str = "error", names: Mapping[str, str] | None = None,
             allowed: Mapping[str, Collection[str]] | None = None,
             log: Callable[[str], None] = print) -> RatingData:
    """Check a parsed dataset and return it with clean dtypes and a fresh RangeIndex.

    `names` maps "ratings"/"users"/"items" to the file names used in messages; `allowed` maps a
    categorical user attribute to its permitted values. Duplicate (user, item) pairs are an error
    unless `duplicates == "keep_latest"`, which keeps the rating with the highest timestamp.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(f"params.yaml: data.duplicates is {duplicates!r}; expected one of "
                          f"{', '.join(DUPLICATE_POLICIES)}")
    n = {**DEFAULT_NAMES, **(names or {})}
    spec = data.spec
    ratings, users, items = data.ratings, data.users, data.items

    require_columns(ratings, ["user_id", "item_id", "rating", "timestamp"], n["ratings"])
    require_columns(users, ["user_id"] + [a.name for a in spec.user_attributes], n["users"])
    require_columns(items, ["item_id"], n["items"])

    if not len(ratings):
        raise DataError(f"{n['ratings']}: no ratings (the table has a header but no data rows); expected at "
                        f"least one rating")
    ratings = ratings.copy()
    exact = {("ratings", key): read_ids(ratings[key], n["ratings"], key) for key in ("user_id", "item_id")}
    scale = f"a number between {spec.rating_min:g} and {spec.rating_max:g}"
    ratings["rating"] = coerce_rating(ratings["rating"], n["ratings"], scale)
    ratings["timestamp"] = coerce_timestamp(ratings["timestamp"], n["ratings"])
    r = ratings["rating"].to_numpy()
    out = (r < spec.rating_min) | (r > spec.rating_max)
    if out.any():
        pos = int(np.argmax(out))
        raise DataError(f"{n['ratings']}: column 'rating', data row {int(ratings.index[pos]) + 1} has "
                        f"{r[pos]:g}; expected {scale}")

    users, items = users.copy(), items.copy()
    ids: dict[str, IdMap] = {}
    for frame, key, file in ((users, "user_id", n["users"]), (items, "item_id", n["items"])):
        own = read_ids(frame[key], file, key)
        ids[key] = IdMap.build(own, exact[("ratings", key)])
        frame[key] = ids[key].codes(own)
        ratings[key] = ids[key].codes(exact[("ratings", key)])
        dup = frame[key].duplicated().to_numpy()
        if dup.any():
            pos = int(np.argmax(dup))
            raise DataError(f"{file}: column {key!r}, data row {int(frame.index[pos]) + 1} repeats id "
                            f"{ids[key].label(frame[key].iloc[pos])}; expected one row per id")

    ratings = _duplicates(ratings, duplicates, n["ratings"], ids, log)

    for key, frame, file, what in (("user_id", users, n["users"], "user"), ("item_id", items, n["items"], "item")):
        unknown = ~ratings[key].isin(frame[key]).to_numpy()
        if unknown.any():
            pos = int(np.argmax(unknown))
            raise DataError(f"{n['ratings']}: {what} {ids[key].label(ratings[key].iloc[pos])} (data row "
                            f"{int(ratings.index[pos]) + 1}) has no row in {file}; expected every rated "
                            f"{what} to have attributes")
    user = lambda pos: ids["user_id"].label(users["user_id"].iloc[pos])

    for attr in spec.user_attributes:
        col = users[attr.name]
        if attr.kind == "numeric":
            users[attr.name] = coerce_float(col, n["users"], attr.name, "a number",
                                            allow_missing=attr.name not in spec.sensitive)
            if np.all(np.isfinite(users[attr.name])) and np.all(users[attr.name] == np.round(users[attr.name])):
                users[attr.name] = users[attr.name].astype(np.int64)
        else:
            listed = col.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).to_numpy(dtype=bool)
            if listed.any():
                pos = int(np.argmax(listed))
                raise DataError(f"{n['users']}: column {attr.name!r}, user {user(pos)} (data row "
                                f"{int(users.index[pos]) + 1}) holds a list; expected one {attr.kind} value")
            blank = _blank(col)
            if blank.any() and attr.name in spec.sensitive:
                pos = int(np.argmax(blank))
                raise DataError(f"{n['users']}: column {attr.name!r}, user {user(pos)} "
                                f"(data row {int(users.index[pos]) + 1}) is empty; expected a value for the "
                                f"sensitive attribute")
            users[attr.name] = col.astype(object).where(~blank, None)
        if allowed and attr.name in allowed:
            ok = set(allowed[attr.name])
            bad = ~users[attr.name].isin(ok).to_numpy() & users[attr.name].notna().to_numpy()
            if bad.any():
                pos = int(np.argmax(bad))
                raise DataError(f"{n['users']}: column {attr.name!r}, user {user(pos)} "
                                f"(data row {int(users.index[pos]) + 1}) has unknown value "
                                f"{users[attr.name].iloc[pos]!r}; expected one of {', '.join(sorted(ok))}")

    for name in spec.sensitive:
        if name not in {a.name for a in spec.user_attributes}:
            raise DataError(f"{n['users']}: sensitive attribute {name!r} is not a declared user attribute; "
                            f"expected one of {', '.join(a.name for a in spec.user_attributes)}")
        groups = group_labels(users, spec, name).dropna().unique()
        if len(groups) < 2:
            only = repr(groups[0]) if len(groups) else "no value"
            raise DataError(f"{n['users']}: sensitive attribute {name!r} has a single group ({only}) across "
                            f"{len(users)} users; expected at least two groups to compare")

    if "release_year" in items.columns:
        items["release_year"] = coerce_float(items["release_year"], n["items"], "release_year",
                                             "a year", allow_missing=True)

    ratings = ratings.astype({"user_id": "int64", "item_id": "int64", "rating": "float64", "timestamp": "int64"})
    return RatingData(ratings=ratings.reset_index(drop=True), users=users.reset_index(drop=True),
                      items=items.reset_index(drop=True), spec=spec, source=data.source,
                      provenance=data.provenance, ids=ids)


def _duplicates(ratings: pd.DataFrame, policy: str, file: str, ids: Mapping[str, IdMap],
                log: Callable[[str], None]) -> pd.DataFrame:
    dup = ratings.duplicated(["user_id", "item_id"], keep=False).to_numpy()
    if not dup.any():
        return ratings
    if policy == "error":
        second = ratings.duplicated(["user_id", "item_id"], keep="first").to_numpy()
        pos = int(np.argmax(second))
        u, i = int(ratings["user_id"].iloc[pos]), int(ratings["item_id"].iloc[pos])
        shown = f"({ids['user_id'].label(u)}, {ids['item_id'].label(i)})"
        first = int(ratings.index[np.argmax(dup & (ratings["user_id"].to_numpy() == u)
                                            & (ratings["item_id"].to_numpy() == i))]) + 1
        raise DataError(f"{file}: data row {int(ratings.index[pos]) + 1} repeats the (user_id, item_id) pair "
                        f"{shown} of data row {first}; expected one rating per pair (set data.duplicates: "
                        f"keep_latest to keep the latest)")
    before = len(ratings)
    order = ratings.assign(_pos=np.arange(before)).sort_values(["timestamp", "_pos"], kind="stable")
    kept = order.drop_duplicates(["user_id", "item_id"], keep="last").sort_values("_pos").drop(columns="_pos")
    log(f"data: {file}: dropped {before - len(kept)} duplicate (user_id, item_id) ratings, kept the latest")
    return kept
