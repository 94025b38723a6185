"""Run the stale cells of a DVC pipeline's matrix stages at the same time; DVC still decides and records.

Why: `dvc repro` runs stages one after another (DVC's parallel-stage request, treeverse/dvc#755,
is open), so the models x seeds matrix (`train@<model>-<seed>`) runs cell after cell although
its cells are independent. This module keeps DVC the judge of what is stale and the keeper of
the record, and only changes who runs the stale cells (docs/DESIGN.md, "The matrix"):

1. `dvc repro <the matrix's upstream stages>`: DVC brings the cells' inputs up to date;
2. `dvc status --json <cells>`: DVC names the stale cells (a change to one model's params makes
   only that model's cells stale, because each cell depends on `model_params.<model>` only);
3. the executor (`metarec.compute`) runs those cells' commands concurrently, here or on a Ray
   cluster, each in its own process with `cpus` threads;
4. `dvc commit --force <the cells that succeeded>`: DVC hashes their deps and outs into dvc.lock
   and its cache exactly as `dvc repro` would have;
5. `dvc repro`: the rest of the pipeline; the cells are now up to date and are not run again.

A failed cell is reported with the tail of its output and the run stops with its exit status
after the cells that succeeded have been recorded (DVC records each finished stage too). A
stopped run (SIGTERM, Ctrl-C) stops every cell: each cell's process dies with the process that
started it (PR_SET_PDEATHSIG on Linux) and the executor cancels what has not finished.
With nothing stale, the executor is never started.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from metarec.errors import MetarecError

OUTPUT_TAIL = 4000   # characters of a failed cell's output that are shown
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class Mapper(Protocol):
    def map(self, fn: Callable, jobs: Sequence[tuple], *, cpus: float = 1.0, label: str = "") -> list: ...


@dataclass(frozen=True)
class Cell:
    """One stage of a matrix (`train@melu-0`): its name, its shell command and its working directory."""

    name: str
    cmd: str
    wdir: str


@dataclass(frozen=True)
class CellResult:
    name: str
    returncode: int
    seconds: float
    output: str


@dataclass(frozen=True)
class MatrixRun:
    """What `reproduce` did: the cells it ran concurrently (in order), and the final exit status."""

    cells: tuple[CellResult, ...]
    returncode: int


def dvc_command() -> list[str]:
    """DVC of this interpreter's environment (the stages' `python` is the same one)."""
    return [sys.executable, "-m", "dvc"]


def matrix_groups(root: str | Path) -> list[tuple[list[str], list[Cell]]]:
    """Each matrix (or foreach) stage of dvc.yaml as (its upstream stages, its cells), in dvc.yaml order.

    A cell is a stage whose name has `@`; cells that depend on one another are not concurrent and
    are refused (`MetarecError`), since nothing in this project's dvc.yaml needs them.
    """
    import networkx as nx
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        graph = repo.index.graph     # edges point from a stage to the stages it depends on
        groups: dict[str, list] = {}
        for st in repo.index.stages:
            if "@" in st.name and st.cmd:
                groups.setdefault(st.name.split("@")[0], []).append(st)
        out = []
        for name, stages in groups.items():
            members = set(stages)
            upstream: set = set()
            for st in stages:
                below = nx.descendants(graph, st)
                if below & members:
                    raise MetarecError(f"dvc.yaml: the cells of stage {name} depend on one another; "
                                       f"they cannot run concurrently")
                upstream |= below
            out.append((sorted(s.name for s in upstream),
                        [Cell(s.name, _shell(s.cmd), str(Path(s.wdir).resolve())) for s in stages]))
        return out
    finally:
        repo.close()


def _shell(cmd: str | list[str]) -> str:
    """A stage's `cmd` as one shell line (DVC allows a list of commands, run in order)."""
    return cmd if isinstance(cmd, str) else " && ".join(cmd)


def stale_cells(root: str | Path, cells: Sequence[Cell]) -> list[Cell]:
    """The cells `dvc status` reports as changed (deps, params, outs or command), in the given order."""
    if not cells:
        return []
    done = subprocess.run([*dvc_command(), "status", "--json", *[c.name for c in cells]], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise MetarecError(f"dvc status failed: {_tail(done.stderr or done.stdout, 400)}")
    changed = json.loads(done.stdout or "{}")
    return [c for c in cells if c.name in changed]


def _die_with_parent() -> None:
    """In the child before exec: receive SIGKILL when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run_cell(name: str, cmd: str, wdir: str, threads: int, env: tuple[tuple[str, str], ...]) -> CellResult:
    """Run one cell's command in its working directory (a job of the executor; module level so it
    pickles by reference). `threads` bounds the cell's BLAS/OpenMP/torch threads; `env` carries the
    variables of the dispatching process that the command needs (PATH, METAREC_*)."""
    environ = {**os.environ, **dict(env), **{v: str(threads) for v in THREAD_VARS}}
    start = time.perf_counter()
    done = subprocess.run(cmd, shell=True, cwd=wdir, env=environ, capture_output=True, text=True,
                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    return CellResult(name, done.returncode, time.perf_counter() - start, (done.stdout or "") + (done.stderr or ""))


def _tail(text: str, n: int = OUTPUT_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def _passed_env() -> tuple[tuple[str, str], ...]:
    keep = ("PATH", "VIRTUAL_ENV", "PYTHONPATH")
    return tuple(sorted((k, v) for k, v in os.environ.items() if k in keep or k.startswith("METAREC_")))


def _dvc(root: str | Path, *args: str) -> int:
    return subprocess.run([*dvc_command(), *args], cwd=root).returncode


def reproduce(root: str | Path, make_executor: Callable[[], Mapper], *, cpus: int = 1,
              echo: Callable[[str], None] = print) -> MatrixRun:
    """The whole pipeline, with every matrix's stale cells run concurrently (steps in the module doc).

    `make_executor()` returns a context manager yielding the executor; it is entered only when some
    cell is stale. Returns the cells run and the exit status (DVC's, or the first failed cell's).
    """
    ran: list[CellResult] = []
    for upstream, cells in matrix_groups(root):
        if upstream and (rc := _dvc(root, "repro", *upstream)) != 0:
            return MatrixRun(tuple(ran), rc)
        todo = stale_cells(root, cells)
        if not todo:
            continue
        echo(f"running {len(todo)} of {len(cells)} cells of {todo[0].name.split('@')[0]} concurrently "
             f"({cpus} CPU each)")
        jobs = [(c.name, c.cmd, c.wdir, cpus, _passed_env()) for c in todo]
        with make_executor() as ex:
            results = ex.map(run_cell, jobs, cpus=float(cpus), label=todo[0].name.split("@")[0])
        ran += results
        ok = [r.name for r in results if r.returncode == 0]
        for r in results:
            echo(f"  {r.name}: {'done' if r.returncode == 0 else f'failed (exit {r.returncode})'} in {r.seconds:.1f}s")
        if ok and (rc := _dvc(root, "commit", "--force", "--quiet", *ok)) != 0:
            return MatrixRun(tuple(ran), rc)
        failed = [r for r in results if r.returncode != 0]
        if failed:
            echo(f"{failed[0].name} failed:\n{_tail(failed[0].output)}")
            return MatrixRun(tuple(ran), failed[0].returncode)
    return MatrixRun(tuple(ran), _dvc(root, "repro"))
