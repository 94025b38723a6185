"""Bring-your-own data: three csv or parquet tables described by params.yaml's `data.schema`.

```yaml
data:
  source: csv                 # or parquet
  interactions: data/my/ratings.csv   # user_id, item_id, rating, optional timestamp
  users: data/my/users.csv            # user_id + declared user attributes
  items: data/my/items.csv            # item_id + declared item features (+ title, release_year)
  duplicates: error           # or keep_latest
  schema:
    user_attributes:
      - {name: gender, kind: categorical, values: [F, M]}
      - {name: age, kind: numeric, edges: [25, 45], labels: ["<25", "25-44", "45+"]}
    item_features:
      - {name: genres, kind: multilabel, separator: "|"}
    sensitive: [gender, age]
    rating_min: 1
    rating_max: 5
```
Every cell is read as text and converted by the validation helpers, so a bad value is reported with
its file, column and data row instead of being coerced silently by the csv reader.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.config import SchemaConfig, validated
from metarec.data.schema import AttrSpec, DataSpec, RatingData
from metarec.data.validate import coerce_float, decode_text, require_columns, validate
from metarec.errors import ConfigError, DataError
from metarec.io import sha256_file

FORMATS = ("csv", "parquet")


def spec_from_schema(schema: dict) -> tuple[DataSpec, dict[str, tuple[str, ...]]]:
    """params.yaml's `data.schema` (checked by metarec.config.SchemaConfig) to a DataSpec plus the
    allowed values of categorical attributes."""
    if schema is None:
        raise ConfigError("params.yaml: data.schema is missing; expected user_attributes, item_features, "
                          "sensitive, rating_min and rating_max")
    cfg = validated(SchemaConfig, schema, prefix=("data", "schema"))
    allowed = {a.name: tuple(str(v) for v in a.values) for a in cfg.user_attributes if a.values is not None}

    def attrs(entries) -> tuple[AttrSpec, ...]:
        return tuple(AttrSpec(name=a.name, kind=a.kind, edges=tuple(a.edges), labels=tuple(a.labels),
                              separator=a.separator) for a in entries)

    spec = DataSpec(user_attributes=attrs(cfg.user_attributes), item_features=attrs(cfg.item_features),
                    sensitive=tuple(cfg.sensitive), rating_min=cfg.rating_min, rating_max=cfg.rating_max)
    return spec, allowed


def read_table(path: Path, fmt: str) -> pd.DataFrame:
    """One table with every cell as text (csv) or as stored (parquet), indexed by 0-based data row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a {fmt} table")
    if fmt == "csv":
        text = decode_text(path.read_bytes(), str(path), "utf-8")
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{path}: not a readable csv table ({str(exc).strip()}); expected a header row "
                            f"and comma-separated fields") from None
    else:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.reset_index(drop=True)


def multilabel_text(column: pd.Series, attr: AttrSpec, file: str) -> pd.Series:
    """A multi-label column to the in-memory form, labels joined by the attribute's separator.

    Text cells are taken as already joined. List cells (a parquet `list<string>` column) are joined
    here, and a label that itself contains the separator is refused: it would split into two
    labels that nobody declared.
    """
    out = []
    for pos, v in enumerate(column.astype(object).tolist()):
        if isinstance(v, (list, tuple, np.ndarray)):
            labels = [str(x).strip() for x in v if x is not None and str(x).strip()]
            bad = [x for x in labels if attr.separator in x]
            if bad:
                raise DataError(f"{file}: column {attr.name!r}, data row {pos + 1} has label {bad[0]!r}, which "
                                f"contains the separator {attr.separator!r}; expected labels without it")
            out.append(attr.separator.join(labels))
        elif v is None or (isinstance(v, float) and np.isnan(v)):
            out.append("")
        else:
            out.append(str(v).strip())
    return pd.Series(out, index=column.index, name=column.name, dtype=object)


def load_tabular(cfg: dict, fmt: str, *, workdir: str | Path = ".",
                 log: Callable[[str], None] = print) -> RatingData:
    """Read, convert and validate the three bring-your-own tables."""
    if fmt not in FORMATS:
        raise ConfigError(f"params.yaml: data.source is {fmt!r}; expected one of {', '.join(FORMATS)}")
    spec, allowed = spec_from_schema(cfg.get("schema"))
    paths = {}
    for key in ("interactions", "users", "items"):
        if not cfg.get(key):
            raise ConfigError(f"params.yaml: data.{key} is not set; expected the path of the {key} {fmt} file")
        paths[key] = Path(workdir) / cfg[key]
    inter = read_table(paths["interactions"], fmt)
    users = read_table(paths["users"], fmt)
    items = read_table(paths["items"], fmt)

    require_columns(inter, ["user_id", "item_id", "rating"], str(paths["interactions"]))
    if "timestamp" not in inter.columns:
        inter["timestamp"] = 0
    inter = inter[["user_id", "item_id", "rating", "timestamp"]].copy()
    inter["timestamp"] = inter["timestamp"].mask(inter["timestamp"].astype(str).str.strip() == "", 0)

    user_cols = ["user_id"] + [a.name for a in spec.user_attributes]
    require_columns(users, user_cols, str(paths["users"]))
    users = users[user_cols].copy()

    item_cols = ["item_id"] + [a.name for a in spec.item_features]
    require_columns(items, item_cols, str(paths["items"]))
    extras = [c for c in ("title", "release_date", "release_year") if c in items.columns and c not in item_cols]
    items = items[item_cols + extras].copy()
    for attr in spec.item_features:
        if attr.kind == "multilabel":
            items[attr.name] = multilabel_text(items[attr.name], attr, str(paths["items"]))
        elif attr.kind == "numeric":
            items[attr.name] = coerce_float(items[attr.name], str(paths["items"]), attr.name, "a number",
                                            allow_missing=True)
    if "release_date" in items.columns:
        items["release_date"] = pd.to_datetime(items["release_date"].mask(items["release_date"] == ""),
                                               errors="coerce").astype("datetime64[ns]")
    if "release_year" not in items.columns:
        items["release_year"] = np.nan

    names = {"ratings": str(paths["interactions"]), "users": str(paths["users"]), "items": str(paths["items"])}
    data = RatingData(ratings=inter, users=users, items=items, spec=spec, source=fmt,
                      provenance={"source": fmt, "files": {}})
    data = validate(data, duplicates=cfg.get("duplicates", "error"), names=names, allowed=allowed, log=log)
    data.provenance["files"] = {key: {"path": str(p), "sha256": sha256_file(p)} for key, p in paths.items()}
    log(f"data: {fmt} tables served ({len(data.ratings)} ratings from {paths['interactions']})")
    return data
