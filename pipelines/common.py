"""What every stage needs: params, the prepared data, the task splits, and friendly failure."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

import yaml

from metarec.compute import ComputeConfig, Executor, Stopped, executor, stop_on_signals
from metarec.errors import MetarecError
from metarec.prepared import (ID_TABLES, PREPARED, TASKS, empty_scenarios, load_encoder,  # noqa: F401
                              load_evaluation_split, load_prepared, load_split, scenarios_present,
                              with_original_ids)
from metarec.memory import keep_freed_memory


def load_params(path: str | Path = "params.yaml") -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def stage_executor(params: dict) -> Executor:
    """The stage's executor, configured by params.yaml `compute:` (which is not a DVC param: it
    cannot change a result)."""
    return executor(ComputeConfig.from_params(params))


def stage(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a stage; a known error becomes one sentence on stderr and exit code 2. Freed memory is
    kept for reuse (`keep_freed_memory`): the stages allocate many large, short-lived tensors.

    SIGTERM and Ctrl-C stop the stage (metarec.compute.stop_on_signals): the executor it runs jobs
    on cancels them all and shuts Ray down while the exception unwinds, and the stage exits with
    128 + the signal number, having written nothing more."""

    @functools.wraps(fn)
    def wrapper() -> None:
        keep_freed_memory()
        try:
            with stop_on_signals():
                fn()
        except MetarecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Stopped as stop:
            print(f"{Path(sys.argv[0]).stem or 'stage'}: {stop}; outstanding work cancelled", file=sys.stderr)
            sys.exit(128 + stop.signum)

    return wrapper
