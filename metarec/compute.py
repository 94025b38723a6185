"""The compute layer: one way to run a stage's independent jobs, on this machine or a Ray cluster.

Why one interface: every stage that fans out (evaluation runs, fairness jobs, counterfactual
re-scoring, shilling refits, feedback-loop seeds) needs the same three things: results in job order,
results that do not depend on where a job ran, and a stop that really stops. `Executor.map` gives
them with Ray behind it, or with a plain in-process loop (the reference) when Ray is not worth
starting.

What runs where. The stage process (the Ray driver) plans the jobs and writes every output; jobs only
compute and return. A job is a module-level function and a tuple of ids, scalars and paths (never a
frame): the function travels by reference (module and name), and the worker loads what it needs from
the paths. Locally, `ray.init` starts a private Ray instance on this machine's cores (nothing to
install or start first) the first time a map is worth it, at most once per stage process, and shuts
it down at the end. On a cluster (`compute.address`, else `$RAY_ADDRESS`) the stage connects to it
instead; every node must see the project at the same absolute path (a shared file system), because
each task changes into the project root the stage gives it and imports the project from there.
`METAREC_*` environment variables travel with the tasks.

Determinism. Each job must be seeded from its own inputs only, so its result does not depend on
which process ran it or what ran there before; torch runs each job on `int(cpus)` threads in either
backend, so its arithmetic is the same too. The serial and the Ray runs of a stage therefore write
byte-identical outputs (tests/test_compute.py). For the same reason the `compute:` settings are not
DVC params of any stage: they cannot change a result, and switching to a cluster must not make DVC
re-run the audit.

Stop means stop. Inside `stop_on_signals` (the `pipelines.common.stage` decorator) SIGTERM and
SIGINT raise `Stopped`; an executor unwinding with it force-cancels every outstanding task and shuts
down the Ray it started, and the stage exits with 128 + the signal number. The stage also asks Linux
to send it SIGTERM when its parent (`dvc repro`, which does not forward SIGTERM) dies. No task
outlives the stage, so nothing writes after it ended.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from metarec.errors import ConfigError, MetarecError

Backend = Literal["auto", "ray", "serial"]
BACKENDS: tuple[str, ...] = ("auto", "ray", "serial")
ENV_PREFIX = "METAREC_"
POLL_S = 0.2          # how often a map waiting on Ray looks for a stop request
_STOP: list[int] = []       # the signal that asked the stage to stop, once it came
_WAITING: list[bool] = []   # non-empty while a map waits on Ray


@dataclass(frozen=True)
class ComputeConfig:
    """Where jobs run: the params.yaml `compute:` section. Not a DVC param of any stage (see the module)."""

    address: str | None = None     # a Ray cluster ("HOST:6379"); None: a local Ray on this machine
    workers: int | None = None     # CPUs of the local Ray; None: every core
    backend: Backend = "auto"      # auto: Ray when a map has several jobs and several CPUs (or an address)
    cell_cpus: int = 1             # CPUs per matrix cell run by metarec.matrix (metarec-audit repro)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ComputeConfig":
        """The `compute:` section of a params dict; `address` falls back to $RAY_ADDRESS."""
        section = params.get("compute") or {}
        address = section.get("address") or os.environ.get("RAY_ADDRESS") or None
        workers, backend = section.get("workers"), section.get("backend") or "auto"
        if backend not in BACKENDS:
            raise ConfigError(f"params.yaml compute.backend is {backend!r}; expected one of {', '.join(BACKENDS)}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"params.yaml compute.workers is {workers!r}; expected a whole number of at least 1 "
                              f"or null (every core)")
        cells = section.get("cell_cpus", 1)
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            raise ConfigError(f"params.yaml compute.cell_cpus is {cells!r}; expected a whole number of at least 1")
        return cls(address=str(address) if address else None, workers=workers, backend=backend, cell_cpus=cells)


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the stage. A BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into `Stopped` for the duration (main thread only; elsewhere a no-op).

    The first signal raises; later ones are ignored so that the cleanup it starts is not cut short.
    The parent-death signal (Linux) makes a stage whose `dvc repro` was killed stop the same way.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if not seen:
            seen.append(signum)
            _STOP.append(signum)
            if not _WAITING:   # inside Ray's wait the map raises it (an exception from there is mangled)
                raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    parent = os.getppid()
    _parent_death_signal(signal.SIGTERM)
    try:
        if os.getppid() != parent:      # the parent died before the request took effect
            raise Stopped(signal.SIGTERM)
        yield
    finally:
        _parent_death_signal(0)
        for s, h in old.items():
            signal.signal(s, h)
        _STOP.clear()


def _parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): ask Linux to send `signum` when the parent process dies (0: don't)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0)   # 1 = PR_SET_PDEATHSIG


class Executor:
    """Runs `map`s of independent jobs; a context manager that shuts down only the Ray it started.

    One executor per stage: Ray starts on the first map worth it and is reused by later maps.
    """

    def __init__(self, config: ComputeConfig) -> None:
        self.config = config
        self.root = str(Path.cwd().resolve())
        self._started = False           # this executor called ray.init
        self._pending: list[Any] = []   # object refs of the map in progress

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(cancel=exc is not None)

    def close(self, *, cancel: bool = True) -> None:
        """Force-cancel what is still running (if `cancel`) and shut down the Ray this executor started."""
        import ray

        if cancel:
            self._cancel()
        if self._started:
            self._started = False
            ray.shutdown()

    def width(self) -> int:
        """How many one-CPU jobs run at once: 1 serially, the local Ray's CPUs, or the cluster's
        (Ray is started to ask it). A stage that splits one piece of work into shards uses this so
        that the shards fill the engine; the shards must not change the result."""
        if self.config.backend == "serial":
            return 1
        if self.config.address is None:
            return max(1, int(self.config.workers or os.cpu_count() or 1))
        import ray

        self._start()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def uses_ray(self, n_jobs: int) -> bool:
        """Whether a map of `n_jobs` runs on Ray: always for `ray`, never for `serial`; `auto` when
        there is more than one job and more than one CPU or a cluster address (starting Ray costs
        seconds: not worth it for one job)."""
        if self.config.backend == "serial" or n_jobs == 0:
            return False
        if self.config.backend == "ray":
            return True
        return n_jobs > 1 and (self.config.address is not None or int(self.config.workers or os.cpu_count() or 1) > 1)

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], *, cpus: float = 1.0, label: str = "") -> list:
        """[fn(*job) for job in jobs], in order, each job on `int(cpus)` torch threads.

        `fn` must be a module-level function (it travels by reference); `jobs` hold ids, scalars
        and paths. A MetarecError raised by a job reaches the caller as itself (one sentence); the
        first failure cancels the other jobs.
        """
        jobs = [tuple(j) for j in jobs]
        module, name = _reference(fn)
        threads = max(1, int(cpus))
        if not self.uses_ray(len(jobs)):
            return [_call(fn, job, threads) for job in jobs]
        import ray

        self._start()
        task = ray.remote(_run_job).options(num_cpus=cpus, name=f"metarec:{label or name}")
        self._pending = [task.remote(self.root, module, name, job, threads) for job in jobs]
        try:
            return self._gather(self._pending)
        except ray.exceptions.RayTaskError as exc:
            self._cancel()
            if isinstance(exc.cause, MetarecError):
                raise exc.cause from None
            raise
        except BaseException:
            self._cancel()
            raise
        finally:
            self._pending = []

    @staticmethod
    def _gather(refs: list) -> list:
        """ray.get of every ref, in order, waiting in short steps so that a stop request (or a failed
        job) ends the wait at once rather than when every job has finished."""
        import ray

        done: dict = {}
        waiting = list(refs)
        while waiting:
            _WAITING.append(True)
            try:
                ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=POLL_S)
            finally:
                _WAITING.pop()
            if _STOP:
                raise Stopped(_STOP[0])
            for ref in ready:
                done[ref] = ray.get(ref)   # raises the job's error now
        return [done[ref] for ref in refs]

    def _cancel(self) -> None:
        import ray

        if not self._pending or not ray.is_initialized():
            return
        for ref in self._pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        self._pending = []

    def _start(self) -> None:
        """ray.init once per process: connect to the cluster, or start a local instance."""
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # an audit makes no network calls home
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.root, os.environ.get("PYTHONPATH")) if p)
        runtime_env = {"env_vars": env}
        sigterm = signal.getsignal(signal.SIGTERM)
        self._started = True
        _WAITING.append(True)   # a stop during ray.init is raised once it returns
        try:
            if self.config.address:
                ray.init(address=self.config.address, runtime_env=runtime_env, log_to_driver=True)
            else:
                # Ray runs its workers at nice +15 by default; here they are the stage's own work (as forked
                # children were) and must not starve behind every other process on a busy machine.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(address="local", num_cpus=int(self.config.workers or os.cpu_count() or 1),
                         include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
        finally:
            _WAITING.pop()
            signal.signal(signal.SIGTERM, sigterm)   # ray.init installs its own; keep the stage's stop semantics
        if _STOP:
            raise Stopped(_STOP[0])


def executor(config: ComputeConfig) -> Executor:
    """The executor for one stage (use it as a context manager)."""
    return Executor(config)


def _reference(fn: Callable[..., Any]) -> tuple[str, str]:
    """(module, name) under which a worker imports `fn`; a stage run as `python -m pipelines.x` has
    its functions in `__main__`, whose importable name is the module spec's."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else None
    if not module or "<" in name or "." in name:
        raise TypeError(f"{fn!r} is not a module-level function of an importable module; compute jobs run "
                        f"functions by reference")
    return module, name


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch on `n` threads for the duration: a job's arithmetic must not depend on where it ran.

    torch is not imported for jobs that do not use it (its import costs seconds per worker): if it
    is not loaded yet, OMP_NUM_THREADS (which Ray also sets to a task's CPUs) sizes it when the job
    imports it, and the process's default is put back afterwards.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)
        return
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env
        if "torch" in sys.modules:   # the job imported it
            sys.modules["torch"].set_num_threads(int(env) if env else os.cpu_count() or 1)


def _call(fn: Callable[..., Any], job: tuple, threads: int) -> Any:
    with _torch_threads(threads):
        return fn(*job)


def _run_job(root: str, module: str, name: str, job: tuple, threads: int) -> Any:
    """A Ray task: run `module.name(*job)` from the project root, on `threads` torch threads."""
    if os.getcwd() != root:
        os.chdir(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return _call(getattr(importlib.import_module(module), name), job, threads)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder under the project root (cwd) for what a stage hands its jobs by path
    (every node sees the project at the same path, unlike /tmp); removed afterwards, also on a stop."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=".compute-", dir=Path.cwd()))
    try:
        yield path.resolve()
    finally:
        shutil.rmtree(path, ignore_errors=True)
