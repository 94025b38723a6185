"""Module-level jobs for tests/test_compute.py (compute jobs travel by reference, so they live in an
importable module), and a stage-like entry point whose jobs sleep, then write a file.

    python -m tests.compute_jobs OUT_DIR SECONDS    # a stage that maps `sleep_then_write` on a local Ray
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from metarec.errors import ConfigError


def square_and_pid(i: int, offset: int = 0) -> tuple[int, int]:
    return i * i + offset, os.getpid()


def fail_on(i: int, bad: int) -> int:
    if i == bad:
        raise ConfigError(f"job {bad}: bad input")
    return i


def env_and_cwd(name: str) -> tuple[str | None, str]:
    return os.environ.get(name), os.getcwd()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def sleep_then_write(out: str, i: int, seconds: float) -> int:
    """Say it started (with its pid), sleep, then write: a task that must never reach the write once
    its stage is stopped."""
    Path(out, f"started-{i}").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(out, f"late-{i}").write_text("written after the sleep")
    return i


def main() -> None:
    from metarec.compute import ComputeConfig, executor
    from pipelines.common import stage

    out, seconds = sys.argv[1], float(sys.argv[2])

    @stage
    def run() -> None:
        with executor(ComputeConfig(workers=2, backend="ray")) as ex:
            ex.map(sleep_then_write, [(out, i, seconds) for i in range(2)], label="sleepers")
        Path(out, "stage-finished").write_text("the map returned")

    run()


if __name__ == "__main__":
    main()
