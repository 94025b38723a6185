"""What every stage needs: params, the prepared data, the task splits, and friendly failure."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

import yaml

from metarec.errors import MetarecError
from metarec.prepared import (ID_TABLES, PREPARED, TASKS, empty_scenarios, load_encoder,  # noqa: F401
                              load_evaluation_split, load_prepared, load_split, scenarios_present,
                              with_original_ids)
from metarec.seeding import keep_freed_memory


def load_params(path: str | Path = "params.yaml") -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


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
