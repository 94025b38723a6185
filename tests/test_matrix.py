"""The concurrent matrix (`metarec.matrix`): DVC still decides what is stale and records every cell.

A small DVC project of its own (an upstream stage, a three-cell matrix with one params key per
cell, a downstream stage) is reproduced through `reproduce` and checked against plain `dvc repro`:
same outputs, every cell in dvc.lock, nothing stale afterwards, a changed param re-runs only its
cell, a failed cell stops the run with its exit status and sentence while the others are recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from metarec.errors import MetarecError
from metarec.matrix import Cell, matrix_groups, reproduce, stale_cells

WORK = """\
import json, os, sys, time, yaml
name = sys.argv[1]
value = yaml.safe_load(open("params.yaml"))["p"][name]
start = time.time()
open(f"started-{name}", "w").close()
time.sleep(float(os.environ.get("CELL_SLEEP", "0")))
if value < 0:
    print(f"cell {name}: p.{name} must be positive, got {value}", file=sys.stderr)
    sys.exit(2)
os.makedirs("out", exist_ok=True)
up = open("up.txt").read().strip()
open(f"out/{name}.txt", "w").write(f"{up}:{name}={value * 10}\\n")
with open("runs.log", "a") as fh:
    fh.write(json.dumps({"cell": name, "start": start, "end": time.time(), "threads": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
"""


def _project(tmp: Path) -> Path:
    root = tmp / "proj"
    root.mkdir()
    py = sys.executable
    (root / "work.py").write_text(WORK)
    (root / "up.py").write_text("import yaml\nopen('up.txt', 'w').write(yaml.safe_load(open('params.yaml'))['up'])\n")
    (root / "down.py").write_text("import glob\nparts = [open(f).read() for f in sorted(glob.glob('out/*.txt'))]\n"
                                  "open('all.txt', 'w').write(''.join(parts))\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"cells": ["a", "b", "c"], "p": {"a": 1, "b": 2, "c": 3},
                                                      "up": "base"}))
    (root / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          up:
            cmd: {py} up.py
            deps: [up.py]
            params: [up]
            outs: [up.txt]
          cell:
            matrix:
              name: ${{cells}}
            cmd: {py} work.py ${{item.name}}
            deps: [up.txt, work.py]
            params:
              - p.${{item.name}}
            outs:
              - out/${{item.name}}.txt
          down:
            cmd: {py} down.py
            deps: [out, down.py]
            outs: [all.txt]
        """))
    subprocess.run([py, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


class SerialExecutor:
    """The reference executor: the jobs in order, in this process."""

    def map(self, fn, jobs, *, cpus=1.0, label=""):
        return [fn(*job) for job in jobs]


def serial():
    return contextlib.nullcontext(SerialExecutor())


def _runs(root: Path) -> list[dict]:
    log = root / "runs.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _lock_outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {f"{name}:{o['path']}": o["md5"] for name, st in lock.items() for o in st.get("outs", [])}


def _status(root: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout or "{}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _project(tmp_path)


def test_groups_name_the_matrix_its_upstream_and_commands(project: Path) -> None:
    [(upstream, cells)] = matrix_groups(project)
    assert upstream == ["up"]
    assert [c.name for c in cells] == ["cell@a", "cell@b", "cell@c"]
    assert cells[1].cmd.endswith("work.py b") and Path(cells[1].wdir) == project.resolve()


def test_dispatched_run_equals_plain_dvc_repro_and_records_every_cell(project: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(project, plain)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=plain, check=True)
    run = reproduce(project, serial, echo=lambda s: None)
    assert run.returncode == 0
    assert [r.name for r in run.cells] == ["cell@a", "cell@b", "cell@c"]
    assert (project / "all.txt").read_bytes() == (plain / "all.txt").read_bytes() == b"base:a=10\nbase:b=20\nbase:c=30\n"
    assert _lock_outs(project) == _lock_outs(plain)
    assert _status(project) == {}
    assert [r["cell"] for r in _runs(project)] == ["a", "b", "c"]      # each cell ran once, by the dispatcher
    again = reproduce(project, serial, echo=lambda s: None)
    assert again.returncode == 0 and again.cells == ()
    assert len(_runs(project)) == 3


def test_a_changed_param_reruns_only_its_cell(project: Path) -> None:
    assert reproduce(project, serial, echo=lambda s: None).returncode == 0
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["p"]["b"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    todo = stale_cells(project, matrix_groups(project)[0][1])
    assert [c.name for c in todo] == ["cell@b"]
    run = reproduce(project, serial, echo=lambda s: None)
    assert [r.name for r in run.cells] == ["cell@b"]
    assert (project / "all.txt").read_text() == "base:a=10\nbase:b=70\nbase:c=30\n"
    assert _status(project) == {}


def test_an_upstream_change_reaches_every_cell(project: Path) -> None:
    assert reproduce(project, serial, echo=lambda s: None).returncode == 0
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["up"] = "next"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run = reproduce(project, serial, echo=lambda s: None)
    assert [r.name for r in run.cells] == ["cell@a", "cell@b", "cell@c"]
    assert (project / "all.txt").read_text() == "next:a=10\nnext:b=20\nnext:c=30\n"


def test_a_failed_cell_stops_the_run_with_its_status_and_the_others_are_recorded(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["p"]["c"] = -1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    said: list[str] = []
    run = reproduce(project, serial, echo=said.append)
    assert run.returncode == 2
    assert "cell c: p.c must be positive, got -1" in said[-1]
    assert not (project / "all.txt").exists()                      # downstream never ran
    status = _status(project)
    assert "cell@c" in status and "cell@a" not in status and "cell@b" not in status


def test_cells_get_the_requested_threads(project: Path) -> None:
    assert reproduce(project, serial, cpus=3, echo=lambda s: None).returncode == 0
    assert {r["threads"] for r in _runs(project)} == {"3"}


def test_dependent_cells_are_refused(project: Path) -> None:
    py = sys.executable
    (project / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          chain:
            foreach:
              a: {{src: up.txt}}
              b: {{src: out/a.txt}}
            do:
              cmd: {py} work.py ${{key}}
              deps:
                - ${{item.src}}
              outs:
                - out/${{key}}.txt
        """))
    with pytest.raises(MetarecError, match="the cells of stage chain depend on one another"):
        matrix_groups(project)


def test_cell_is_a_plain_record() -> None:
    c = Cell("train@melu-0", "python -m pipelines.train --model melu --seed 0", "/x")
    with pytest.raises(AttributeError):
        c.name = "other"   # type: ignore[misc]


def _cli(project: Path, sleep: float) -> subprocess.Popen:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["compute"] = {"backend": "ray", "workers": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "CELL_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, "-m", "audit.cli", "repro"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cell_processes(project: Path) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if "work.py" in cmd and cwd == str(project.resolve()):
            out.append(int(pid))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cells_run_at_the_same_time_on_the_engine(project: Path) -> None:
    cli = _cli(project, sleep=4)
    out, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, out
    assert "running 3 of 3 cells of cell concurrently" in out
    runs = sorted(_runs(project), key=lambda r: r["start"])
    assert len(runs) == 3
    assert runs[1]["start"] < runs[0]["end"]              # two workers: the first two overlapped
    assert _status(project) == {}
    assert (project / "all.txt").read_text() == "base:a=10\nbase:b=20\nbase:c=30\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_run_leaves_no_cell_running_or_writing(project: Path) -> None:
    cli = _cli(project, sleep=20)
    deadline = time.time() + 120
    while len(list(project.glob("started-*"))) < 2:
        assert time.time() < deadline and cli.poll() is None, cli.communicate()[0]
        time.sleep(0.2)
    cli.send_signal(signal.SIGTERM)
    out, _ = cli.communicate(timeout=60)
    assert cli.returncode == 128 + signal.SIGTERM, out
    stopped = time.time()
    while _cell_processes(project) and time.time() < stopped + 10:   # they die with their workers
        time.sleep(0.2)
    assert _cell_processes(project) == []
    time.sleep(max(0.0, stopped + 22 - time.time()))     # past the cells' sleep: nothing was written
    assert not list(project.glob("out/*.txt")) and not (project / "runs.log").exists()
    assert "cell@a" in _status(project)
