"""The compute layer (metarec/compute.py): its configuration, the serial reference, a local Ray, a
real two-node Ray cluster on 127.0.0.1, and a stopped stage.

Byte-identity: the evaluate, fairness (with the counterfactual re-scoring) and robustness (shilling
refits and curves) stages write the same bytes on one process, on a local Ray and on the cluster.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metarec.compute import ComputeConfig, Executor, executor
from metarec.errors import ConfigError
from tests import byo_dataset, compute_jobs
from tests.test_byo_pipeline import REPO, trimmed_params

ray = pytest.importorskip("ray")
PYTHON = sys.executable
STAGES = {   # stage -> the outputs it writes that are compared byte for byte
    "evaluate": ["results/per_user.parquet", "results/accuracy_long.parquet", "metrics/summary.json",
                 "plots/accuracy.csv"],
    "fairness": ["metrics/fairness.json", "plots/fairness_gaps.csv"],
    "robustness": ["metrics/robustness.json", "results/robustness_long.parquet", "plots/robustness.csv"],
}


# --- configuration and the serial reference -------------------------------------------------------

def test_config_from_params_reads_the_section_and_falls_back_to_ray_address(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ComputeConfig.from_params({}) == ComputeConfig(None, None, "auto")
    assert ComputeConfig.from_params({"compute": {"address": None, "workers": 3, "backend": "serial"}}) == \
        ComputeConfig(None, 3, "serial")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ComputeConfig.from_params({"compute": {"address": None}}).address == "10.0.0.5:6379"
    assert ComputeConfig.from_params({"compute": {"address": "head:6379"}}).address == "head:6379"


@pytest.mark.parametrize("section, message", [
    ({"backend": "dask"}, "params.yaml compute.backend is 'dask'; expected one of auto, ray, serial"),
    ({"workers": 0}, "params.yaml compute.workers is 0; expected a whole number of at least 1 or null (every core)"),
    ({"workers": "4"}, "params.yaml compute.workers is '4'; expected a whole number of at least 1 or null (every core)"),
    ({"cell_cpus": 0}, "params.yaml compute.cell_cpus is 0; expected a whole number of at least 1"),
])
def test_bad_config_is_one_sentence(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ComputeConfig.from_params({"compute": section})
    assert str(err.value) == message


def test_when_ray_is_used(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    auto = Executor(ComputeConfig())
    assert [auto.uses_ray(n) for n in (0, 1, 2)] == [False, False, True]   # one job: not worth starting Ray
    assert not Executor(ComputeConfig(workers=1)).uses_ray(5)              # one CPU: no parallelism to gain
    assert Executor(ComputeConfig(address="head:6379", workers=1)).uses_ray(2)
    assert Executor(ComputeConfig(backend="ray")).uses_ray(1)
    assert not Executor(ComputeConfig(backend="serial", address="head:6379")).uses_ray(9)
    # how many shards fill the engine: every local core, the workers asked for, one serially
    assert (auto.width(), Executor(ComputeConfig(workers=3)).width()) == (8, 3)
    assert Executor(ComputeConfig(backend="serial", workers=3)).width() == 1


def test_serial_map_is_the_plain_loop_in_order() -> None:
    with executor(ComputeConfig(backend="serial")) as ex:
        got = ex.map(compute_jobs.square_and_pid, [(i, 1) for i in range(5)])
        assert [v for v, _ in got] == [1, 2, 5, 10, 17] and {pid for _, pid in got} == {os.getpid()}
        assert ex.map(compute_jobs.square_and_pid, []) == []
        with pytest.raises(ConfigError, match=r"^job 2: bad input$"):
            ex.map(compute_jobs.fail_on, [(i, 2) for i in range(4)])
        with pytest.raises(TypeError, match="is not a module-level function of an importable module"):
            ex.map(lambda i: i, [(1,), (2,)])
    assert not ray.is_initialized()


# --- a local Ray ------------------------------------------------------------------------------------

def test_local_ray_runs_jobs_elsewhere_in_order_and_passes_errors_and_env(monkeypatch) -> None:
    monkeypatch.setenv("METAREC_COMPUTE_PROBE", "carried")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert not ray.is_initialized()
    with executor(ComputeConfig(workers=2, backend="auto")) as ex:
        got = ex.map(compute_jobs.square_and_pid, [(i, 0) for i in range(6)], label="squares")
        assert [v for v, _ in got] == [i * i for i in range(6)]
        assert os.getpid() not in {pid for _, pid in got}                       # ran in Ray workers
        assert ex.map(compute_jobs.env_and_cwd, [("METAREC_COMPUTE_PROBE",)] * 2) == \
            [("carried", str(Path.cwd().resolve()))] * 2                         # env and project root
        assert ex.map(compute_jobs.torch_threads, [()] * 2, cpus=1) == [1, 1]
        with pytest.raises(ConfigError) as err:                                  # the same one sentence
            ex.map(compute_jobs.fail_on, [(i, 3) for i in range(5)])
        assert type(err.value) is ConfigError and str(err.value) == "job 3: bad input"
        assert ray.is_initialized()
    assert not ray.is_initialized()   # it shut down the Ray it started


# --- the stages on a small project: serial, local Ray, two-node cluster --------------------------

def _write_params(root: Path, compute: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compute"] = compute
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _run_stage_here(root: Path, name: str, argv: list[str] | None = None) -> None:
    """Run a stage's main() in this process from `root` (saves an interpreter start per stage)."""
    import importlib

    module = importlib.import_module(f"pipelines.{name}")
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(root)
    sys.argv = [f"{name}.py", *(argv or [])]
    try:
        module.main()
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv


MELU = ["rankings/melu/seed0.parquet", "predictions/melu/seed0.parquet"]   # train@melu-0's lists and predictions


def _outputs(root: Path) -> dict[str, bytes]:
    return {p: (root / p).read_bytes() for paths in [*STAGES.values(), MELU] for p in paths}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small audit project (the second dataset shape, models mean and bias, two seeds) whose
    prepare, tasks and train stages have run; the code is this checkout's."""
    root = tmp_path_factory.mktemp("compute_project")
    params = trimmed_params(byo_dataset.write(root / "byo"))
    params["seeds"] = [0, 1]
    params["fairness"].update(counterfactual_models=["bias"], counterfactual_seeds=None)
    params["robustness"].update(models=["bias", "mean"])
    params["robustness"]["shilling"].update(models=["mean", "bias"])
    # MeLU is trained here (outside the audited models) for the cluster's sharded catalogue scoring
    params["model_params"]["melu"] = {"epochs": 1, "embedding_dim": 8, "hidden": [16, 8], "local_steps": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("prepare", "tasks"):
        _run_stage_here(root, name)
    for model in params["models"]:
        for seed in params["seeds"]:
            _run_stage_here(root, "train", ["--model", model, "--seed", str(seed)])
    _run_stage_here(root, "train", ["--model", "melu", "--seed", "0"])
    return root


@pytest.fixture(scope="module")
def serial_outputs(project: Path) -> dict[str, bytes]:
    _write_params(project, {"address": None, "workers": None, "backend": "serial"})
    for name in STAGES:
        _run_stage_here(project, name)
    return _outputs(project)


@pytest.mark.slow
def test_local_ray_writes_the_same_bytes_as_one_process(project: Path, serial_outputs: dict, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))   # the project holds data only; its code is this checkout
    _write_params(project, {"address": None, "workers": 2, "backend": "ray"})
    for p in serial_outputs:
        if p not in MELU:   # trained in one process whatever the backend: only a cluster shards it
            (project / p).unlink()
    for name in STAGES:
        _run_stage_here(project, name)
    assert not ray.is_initialized()
    assert _outputs(project).keys() == serial_outputs.keys()
    assert [p for p, b in _outputs(project).items() if b != serial_outputs[p]] == []
    shilling = [r for r in yaml.safe_load((project / "metrics/robustness.json").read_text())["records"]
                if r["kind"] == "shilling"]
    assert {r["model"] for r in shilling} == {"mean", "bias"}   # the refits ran as jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: Path) -> None:
    """Kill exactly the processes of this test's cluster (those naming its temp dir, and their
    children), never other Ray instances on the machine (`ray stop` would stop them all)."""
    import psutil

    me = os.getpid()
    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != me
             and any(str(temp_dir) in a for a in (p.info["cmdline"] or []))]
    procs = {q.pid: q for r in roots for q in [r, *r.children(recursive=True)] if q.pid != me}
    for q in procs.values():
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs.values()), timeout=20)


@pytest.fixture
def cluster(tmp_path: Path):
    """A head and a worker node on 127.0.0.1, one CPU each, with token authentication on (a random
    token in a file both nodes and the stage read; Ray 2.60 enables it by default for local clusters
    only, and the product must work with it)."""
    temp_dir = Path("/tmp") / f"mra-{secrets.token_hex(4)}"   # Ray's socket paths must stay short
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONPATH": str(REPO),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    ray_cli = str(Path(PYTHON).parent / "ray")
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        for cmd in ([ray_cli, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                     f"--dashboard-agent-listen-port={_free_port()}", *common],
                    [ray_cli, "start", f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}",
                     *common]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        _kill_cluster(temp_dir)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


@pytest.mark.slow
def test_two_node_cluster_writes_the_same_bytes_as_one_process(project: Path, serial_outputs: dict,
                                                               cluster) -> None:
    address, env = cluster
    _write_params(project, {"address": address, "workers": None, "backend": "auto"})
    for p in serial_outputs:
        (project / p).unlink()
    for args in [["train", "--model", "melu", "--seed", "0"], *[[name] for name in STAGES]]:
        r = subprocess.run([PYTHON, "-m", f"pipelines.{args[0]}", *args[1:]], cwd=project, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        if args[0] == "train":   # MeLU's catalogue scored in one shard per CPU of the cluster
            assert "catalogue scoring: 2 shards per scenario on the cluster" in r.stdout, r.stdout[-2000:]
    assert [p for p, b in _outputs(project).items() if b != serial_outputs[p]] == []
    # both nodes took part
    probe = subprocess.run([PYTHON, "-c", "import ray; ray.init(address='" + address + "', log_to_driver=False); "
                            "print(sum(n['Alive'] for n in ray.nodes()))"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.stdout.strip().splitlines()[-1] == "2", probe.stderr[-2000:]


# --- stop means stop --------------------------------------------------------------------------------

SLEEP_S = 20.0   # each job sleeps this long, then writes
STOP_S = 10.0    # a stopped stage exits within this (a few seconds on a quiet machine: cancel, shutdown)


def _wait_for_jobs(out: Path, proc: subprocess.Popen) -> tuple[list[int], float]:
    """The pids of the two sleeping jobs, once both have started, and when the first started."""
    deadline = time.monotonic() + 180
    while len(list(out.glob("started-*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    starts = sorted(out.glob("started-*"))
    return [int(p.read_text()) for p in starts], min(p.stat().st_mtime for p in starts)


def _nothing_written_later(out: Path, workers: list[int], started: float) -> None:
    import psutil

    time.sleep(max(0.0, started + SLEEP_S + 2 - time.time()))        # past the jobs' sleep
    assert sorted(p.name for p in out.iterdir()) == ["started-0", "started-1"]
    alive = [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []                                               # no worker of the run remains


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_stage_cancels_its_tasks_and_nothing_writes_afterwards(tmp_path: Path, sig) -> None:
    proc = subprocess.Popen([PYTHON, "-m", "tests.compute_jobs", str(tmp_path), str(SLEEP_S)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers, started = _wait_for_jobs(tmp_path, proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert time.monotonic() - t0 < STOP_S                            # promptly, not when the jobs end
    assert f"stopped by {sig.name}; outstanding work cancelled" in err
    _nothing_written_later(tmp_path, workers, started)


def test_every_dvc_yaml_command_is_execd_so_the_stage_is_dvcs_child() -> None:
    """DVC runs a stage's `cmd` through $SHELL (else /bin/sh). Debian's /bin/sh (dash) forks for
    `sh -c 'python ...'`, so without `exec` the stage's parent is the shell, which outlives a
    stopped `dvc repro`, and the stage runs on to the end."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert [n for n, st in stages.items() if not str(st["cmd"]).startswith("exec python -m pipelines.")] == []


def _shells() -> list[str]:
    return [s for s in ("/bin/sh", "/bin/bash") if Path(s).exists()]


@pytest.mark.parametrize("shell", _shells())
def test_sigterm_to_dvc_repro_stops_the_stage_it_runs(tmp_path: Path, shell: str) -> None:
    """`dvc repro` does not forward SIGTERM; the stage stops when its parent dies (PR_SET_PDEATHSIG),
    under a shell that forks (dash) as under one that execs a lone command (bash)."""
    dvc = Path(PYTHON).parent / "dvc"
    if not sys.platform.startswith("linux") or not dvc.exists():
        pytest.skip("needs Linux and dvc next to this python")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sleepers": {
        "cmd": f"exec python -m tests.compute_jobs out {SLEEP_S}", "outs": ["out/stage-finished"]}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
           "SHELL": shell}
    assert subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, env=env).returncode == 0
    # SIGTERM's default action, whatever this process inherited (an ignored signal stays ignored across exec)
    proc = subprocess.Popen([str(dvc), "repro"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    workers, started = _wait_for_jobs(out, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    _nothing_written_later(out, workers, started)
