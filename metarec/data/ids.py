"""User and item ids as the data owner has them, and the dense integer codes the pipeline uses.

Why: production ids are strings (UUIDs, SKUs) or integers wider than a float's 53-bit mantissa,
and an id that changes on the way through the audit makes every per-user finding unverifiable. So
ids are read exactly (text stays text, integers never pass through float64), ids that cannot be
kept exactly are refused with their row, and each id gets an int64 code once, at `prepare`:

- kind "integer": every id is a plain integer within the signed 64-bit range; the code *is* the id,
  so integer datasets (MovieLens included) look the same inside and outside the pipeline;
- kind "string": at least one id is text; every id is kept as its text and coded 0..n-1 in sorted
  order of the text.

The mapping tables (`data/prepared/user_ids.parquet`, `item_ids.parquet`: `code`, `original`) let
every output that names users or items carry the original ids next to the codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from metarec.errors import DataError

IdKind = Literal["integer", "string"]
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
FLOAT_EXACT = 2 ** 53  # beyond this a float id may already have lost digits
_INTEGER = re.compile(r"[+-]?\d+")
EXPECTED = "an id (an integer within the signed 64-bit range, or text that is not a number)"


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_ids(series: pd.Series, file: str, column: str) -> pd.Series:
    """One column of ids to exact Python values (int or str), refusing what cannot stay exact.

    Refused, naming the 1-based data row: empty values; integers outside the signed 64-bit range
    (text or unsigned parquet columns); text that is a number but not a plain integer ("2.5",
    "3.0", "1e20": an integer in one reader and a string in another); floats that are not integers
    or exceed 2^53 (where a float may already have lost digits). Integral floats up to 2^53 (a
    pandas-written parquet column of ids that once held NaN) are exact and accepted.
    """
    fast = _fast_integers(series)
    if fast is not None:
        return fast
    values = series.astype(object).tolist()
    out: list[int | str] = []
    for pos, v in enumerate(values):
        row = int(series.index[pos]) + 1
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{file}: column {column!r}, data row {row} is empty; expected {EXPECTED}")
        if isinstance(v, (bool, np.bool_)):
            raise DataError(f"{file}: column {column!r}, data row {row} has {v!r}; expected {EXPECTED}")
        if isinstance(v, (int, np.integer)):
            n = int(v)
        elif isinstance(v, str):
            text = v.strip()
            if not _INTEGER.fullmatch(text):
                if _is_number_text(text):
                    raise DataError(f"{file}: column {column!r}, data row {row} has {v!r}; expected {EXPECTED}")
                out.append(text)
                continue
            n = int(text)
        elif isinstance(v, (float, np.floating)) and float(v).is_integer() and abs(v) <= FLOAT_EXACT:
            n = int(v)  # a float column of small integers (pandas writes one when a column had NaN)
        else:  # other floats and anything else a parquet column may hold
            raise DataError(f"{file}: column {column!r}, data row {row} has {v!r} (a {type(v).__name__}); "
                            f"expected {EXPECTED}")
        if not INT64_MIN <= n <= INT64_MAX:
            raise DataError(f"{file}: column {column!r}, data row {row} has {v!r}, outside the signed 64-bit "
                            f"range; expected {EXPECTED}")
        out.append(n)
    return pd.Series(out, index=series.index, name=series.name, dtype=object)


def _fast_integers(series: pd.Series) -> pd.Series | None:
    """The common case without a per-value loop: signed integer columns, or short digit strings."""
    if pd.api.types.is_signed_integer_dtype(series.dtype) and not series.isna().any():
        return pd.Series([int(v) for v in series.to_numpy(np.int64)], index=series.index, name=series.name,
                         dtype=object)
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        text = series.astype(object)
        if not text.map(lambda v: isinstance(v, str)).all():
            return None
        text = text.str.strip()
        if text.str.fullmatch(r"[+-]?\d{1,18}").all():
            return pd.Series([int(v) for v in text.to_numpy(np.int64)] if len(text) else [], index=series.index,
                             name=series.name, dtype=object)
    return None


@dataclass(frozen=True)
class IdMap:
    """Original ids in code order: `originals[code]` for kind "string"; the identity for "integer"."""

    kind: IdKind
    originals: tuple[int | str, ...]

    @classmethod
    def build(cls, *columns: pd.Series) -> "IdMap":
        """The map over every id in the given columns (outputs of read_ids)."""
        values = [v for c in columns for v in c.tolist()]
        if all(isinstance(v, int) for v in values):
            return cls("integer", tuple(sorted(set(values))))
        return cls("string", tuple(sorted({str(v) for v in values})))

    def codes(self, ids: pd.Series) -> pd.Series:
        """Exact ids (read_ids output) to int64 codes."""
        if self.kind == "integer":
            return pd.Series(np.array(ids.tolist(), dtype=np.int64), index=ids.index, name=ids.name)
        lookup = {v: i for i, v in enumerate(self.originals)}
        return pd.Series(np.array([lookup[str(v)] for v in ids.tolist()], dtype=np.int64),
                         index=ids.index, name=ids.name)

    def original(self, codes) -> pd.Series:
        """int64 codes back to the original ids (int64 or string dtype)."""
        codes = np.asarray(codes, dtype=np.int64)
        if self.kind == "integer":
            return pd.Series(codes, dtype="int64")
        table = np.array(self.originals, dtype=object)
        return pd.Series(table[codes], dtype="string")

    def label(self, code: int) -> int | str:
        """One code's original id, for messages."""
        return int(code) if self.kind == "integer" else self.originals[int(code)]

    def to_frame(self) -> pd.DataFrame:
        """The mapping table written to data/prepared: code, original."""
        if self.kind == "integer":
            codes = np.array(self.originals, dtype=np.int64)
            return pd.DataFrame({"code": codes, "original": codes})
        return pd.DataFrame({"code": np.arange(len(self.originals), dtype=np.int64),
                             "original": pd.Series(self.originals, dtype="string")})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "IdMap":
        frame = frame.sort_values("code")
        if pd.api.types.is_integer_dtype(frame["original"]):
            return cls("integer", tuple(int(v) for v in frame["original"]))
        return cls("string", tuple(str(v) for v in frame["original"]))

    @classmethod
    def identity(cls, codes) -> "IdMap":
        """For data built in memory with integer ids (synthetic, tests)."""
        return cls("integer", tuple(sorted({int(c) for c in np.asarray(codes, dtype=np.int64)})))
