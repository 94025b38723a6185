"""One entry point for every data source, and the summary `metarec-audit data` prints
(audit/config.py runs that command: it validates the whole params.yaml first).

Whatever the source, the result has passed metarec.data.validate before the caller can write
anything, so the `prepare` stage never persists data that a later stage would reject.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metarec.data.schema import RatingData
from metarec.data.validate import canonical_checksum, group_labels, validate
from metarec.errors import ConfigError

SOURCES = ("movielens-100k", "csv", "parquet", "synthetic")


def load_dataset(cfg: dict, *, workdir: str | Path = ".", log: Callable[[str], None] = print) -> RatingData:
    """Load and validate the dataset described by params.yaml's `data` block.

    Every source records `provenance["canonical_sha256"]` (validate.canonical_checksum). For the
    synthetic source the ground truth of the planted effects is returned in
    `provenance["ground_truth"]` (the prepare stage writes it to ground_truth.json).
    """
    data = _load(cfg, workdir=workdir, log=log)
    data.provenance.setdefault("source", data.source)
    data.provenance.setdefault("canonical_sha256", canonical_checksum(data.ratings))
    return data


def _load(cfg: dict, *, workdir: str | Path, log: Callable[[str], None]) -> RatingData:
    if not isinstance(cfg, dict):
        raise ConfigError("params.yaml: the data block is missing or not a mapping; expected data.source "
                          f"to be one of {', '.join(SOURCES)}")
    source = cfg.get("source")
    if source == "movielens-100k":
        from metarec.data.movielens import load_movielens

        return load_movielens(cfg, workdir=workdir, log=log)
    if source in ("csv", "parquet"):
        from metarec.data.tabular import load_tabular

        return load_tabular(cfg, source, workdir=workdir, log=log)
    if source == "synthetic":
        from metarec.data.synthetic import generate

        params = {**{k: v for k, v in cfg.items() if k != "synthetic"}, **(cfg.get("synthetic") or {})}
        data, truth = generate(params)
        data = validate(data, duplicates=cfg.get("duplicates", "error"),
                        names={"ratings": "synthetic ratings", "users": "synthetic users", "items": "synthetic items"},
                        log=log)
        data.provenance["ground_truth"] = truth
        log(f"data: synthetic source served (seed {params.get('seed', 0)}, {len(data.ratings)} ratings)")
        return data
    raise ConfigError(f"params.yaml: data.source is {source!r}; expected one of {', '.join(SOURCES)}")


def summary(data: RatingData) -> list[str]:
    """Human-readable lines: source, counts, checksum and group sizes per sensitive attribute."""
    canonical = data.provenance.get("canonical_sha256") or canonical_checksum(data.ratings)
    served = data.provenance.get("source", data.source)
    where = data.provenance.get("location")
    lines = [f"source: {data.source} (served by {served}{f', {where}' if where else ''})",
             f"ratings: {len(data.ratings)}  users: {data.ratings['user_id'].nunique()} "
             f"(of {len(data.users)})  items: {data.ratings['item_id'].nunique()} (of {len(data.items)})",
             f"canonical sha256: {canonical}"]
    for name in data.spec.sensitive:
        counts = group_labels(data.users, data.spec, name).value_counts(dropna=False).sort_index()
        lines.append(f"{name}: " + ", ".join(f"{g}={int(c)}" for g, c in counts.items()))
    return lines
