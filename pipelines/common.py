"""What every stage needs: params, the prepared data, the task splits, and friendly failure."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

import pandas as pd
import yaml

from metarec.data.ids import IdMap
from metarec.data.schema import DataSpec, RatingData
from metarec.errors import MetarecError
from metarec.features import FeatureEncoder
from metarec.seeding import keep_freed_memory
from metarec.tasks import SCENARIOS, TaskSet

PREPARED = Path("data/prepared")
TASKS = Path("data/tasks")
# The mapping tables from internal codes to the ids as the data owner wrote them (metarec.data.ids).
ID_TABLES = {"user_id": "user_ids.parquet", "item_id": "item_ids.parquet"}


def load_params(path: str | Path = "params.yaml") -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_prepared(root: Path = PREPARED) -> RatingData:
    meta = json.loads((root / "meta.json").read_text())
    ids = {key: IdMap.from_frame(pd.read_parquet(root / name)) for key, name in ID_TABLES.items()
           if (root / name).is_file()}
    return RatingData(
        ratings=pd.read_parquet(root / "ratings.parquet"), users=pd.read_parquet(root / "users.parquet"),
        items=pd.read_parquet(root / "items.parquet"), spec=DataSpec.from_dict(meta["spec"]),
        source=meta["source"], provenance=meta.get("provenance", {}), ids=ids)


def with_original_ids(frame: pd.DataFrame, data: RatingData) -> pd.DataFrame:
    """`frame` plus `original_user_id` / `original_item_id` next to each code column it has.

    Why: outputs that name users or items (predictions, rankings, per-user metrics) must be
    readable against the data owner's own ids; the int64 codes stay for joins inside the audit.
    The original column is int64 for integer ids and string for text ids.
    """
    out = frame.copy()
    for key in ID_TABLES:
        if key in out.columns:
            out[f"original_{key}"] = data.id_map(key).original(out[key].to_numpy()).to_numpy()
    return out


def scenarios_present(root: Path = TASKS) -> tuple[str, ...]:
    """The evaluation scenarios that have users and items, in SCENARIOS order.

    The tasks stage records each empty scenario with its reason in summary.json (`empty`); every
    later stage loops over this instead of SCENARIOS, so an empty scenario is skipped, never a crash.
    """
    empty = json.loads((root / "summary.json").read_text()).get("empty", {})
    return tuple(s for s in SCENARIOS if s not in empty)


def empty_scenarios(root: Path = TASKS) -> dict[str, str]:
    """scenario -> why it is empty (e.g. "no item has release_year >= 1997"), from summary.json."""
    return dict(json.loads((root / "summary.json").read_text()).get("empty", {}))


def load_split(name: str, data: RatingData | None = None, root: Path = TASKS) -> TaskSet:
    data = data or load_prepared()
    return TaskSet.read(root / f"{name}.parquet", data.users, data.items)


def load_encoder(root: Path = TASKS) -> FeatureEncoder:
    return FeatureEncoder.from_json((root / "encoder.json").read_text())


def stage(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage; a known error becomes one sentence on stderr and exit code 2. Freed memory is
    kept for reuse (`keep_freed_memory`): the stages allocate many large, short-lived tensors."""

    @functools.wraps(fn)
    def wrapper() -> None:
        keep_freed_memory()
        try:
            fn()
        except MetarecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


T = TypeVar("T")
_FORKED: Callable[[int], object] | None = None


def _call_forked(i: int) -> object:
    assert _FORKED is not None
    return _FORKED(i)


def map_forked(fn: Callable[[int], T], n: int, workers: int | None = None) -> list[T]:
    """[fn(0), ..., fn(n - 1)] on up to `workers` (default: all cores) forked processes, in order.

    Why: the fairness and attack stages are many independent, single-threaded pandas/scikit-surprise
    jobs; on two cores they finish in about half the time. `fn` may be a closure: the children
    inherit it through fork, and only indices and results cross the process boundary. Each job
    must be deterministic on its own (seeded from its inputs), so the results do not depend on
    which process ran it. Call it before the parent runs any torch operation (OpenMP is not
    fork-safe once its threads exist). Falls back to a plain loop without fork or with one worker.
    """
    global _FORKED
    workers = min(n, workers or os.cpu_count() or 1)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(i) for i in range(n)]
    _FORKED = fn
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_call_forked, range(n), chunksize=1)
    finally:
        _FORKED = None
