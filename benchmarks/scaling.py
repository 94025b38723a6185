"""How the audit's cost grows with the data: wall time, CPU time and peak memory of every DVC stage
on the synthetic source at MovieLens-like sizes, and the ratio of each size to the one 10x smaller.

Why: the targets of issue 18 (no stage more than 12x slower per 10x ratings; peak RSS at most 4 GB at
10M ratings) are about how stages *grow*, so every size runs the same fixed trimmed configuration
(`scaling_params`: seeds [0, 1], models melu, bias, svd and mean, every audit stage on) in its own
scratch copy of the project's tracked files, and each stage is run alone (`dvc repro -s STAGE`, in
dvc.yaml's order) so that its cost is its own. Per stage the benchmark records:

- wall_s and cpu_s (user + system of the stage's whole process tree: wait4's figure, or the sum
  of every process's CPU time polled every 0.2 s where that is larger, because a local Ray's
  workers are killed at shutdown and never reaped into wait4's);
- rss_max_gb: the largest resident set of any single process of the tree (wait4's, or the polled
  largest where that is larger, for the same reason);
- rss_tree_gb: the largest sum of resident sets over the tree, polled every 0.2 s (forked workers
  run side by side; pages they share with their parent are counted in each, so this is an upper
  bound that can miss a peak shorter than the polling interval).

Both include the `dvc` process itself (about 0.1 GB). Results go to `<workdir>/<size>.json` and a
markdown table (docs/SCALING.md quotes it) to stdout and `--out`:

    python benchmarks/scaling.py --sizes 100k,1m --workdir /tmp/scaling --out /tmp/scaling/table.md
    python benchmarks/scaling.py --sizes 100k,1m --workdir /tmp/scaling --reuse    # table from saved runs
    python benchmarks/scaling.py --sizes 1m --address 127.0.0.1:6379              # on a Ray cluster
    python benchmarks/scaling.py --sizes 1m,10m --max-per-group 500 --feedback-users 2000 --workdir /tmp/scaling-sampled
    python benchmarks/scaling.py --sizes 100k,1m --reuse --profile fairness,robustness

`--profile` re-runs the named stages (after the measured runs, in the same scratch project) under
cProfile, in one process (`os.cpu_count` set to 1, so the executor's `auto` backend runs its jobs in
the profiled process rather than on Ray workers), and prints each one's top functions by cumulative
time; the `.prof` files stay in the workdir for `pstats`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
# name -> (ratings, users, items): MovieLens-100K, -1M and -10M shapes ("smoke": a minute-long check
# of the harness itself, not a point of the table).
SIZES: dict[str, tuple[int, int, int]] = {
    "smoke": (20_000, 300, 600),
    "100k": (100_000, 943, 1_682),
    "1m": (1_000_000, 6_040, 3_706),
    "10m": (10_000_000, 69_878, 10_677),
}
MODELS = ["melu", "bias", "svd", "mean"]
SEEDS = [0, 1]
POLL_S = 0.2
GB = 1024 ** 3


@dataclass
class StageCost:
    """What one stage cost at one size (see the module docstring for each field)."""

    stage: str
    wall_s: float
    cpu_s: float
    rss_max_gb: float
    rss_tree_gb: float
    load_1min: float = 0.0    # the machine's load average when the stage ended (others' work included)


def scaling_params(base: Mapping, size: str, address: str | None = None, max_per_group: int | None = None,
                   feedback_users: int | None = None) -> dict:
    """The fixed trimmed configuration at one size: `base` (the repository's params.yaml) with the
    synthetic source scaled like MovieLens, two seeds and four models, and every audit section kept
    on but pointed at models in the list. `address` adds `compute: {address: ...}` (a Ray cluster);
    `max_per_group` sets `evaluation.sample: {max_per_group: N}` (the users x items steps then score a
    stratified sample of each scenario's users, the supported bound at sizes past one machine);
    `feedback_users` sets `feedback.max_users` (the simulation's users x items bound)."""
    n_ratings, n_users, n_items = SIZES[size]
    params = json.loads(json.dumps(base))   # a deep copy that leaves the caller's mapping alone
    params["data"] = {**params["data"], "source": "synthetic",
                      "synthetic": {"seed": 0, "n_users": n_users, "n_items": n_items, "n_ratings": n_ratings,
                                    "effects": []}}
    params.update(seeds=list(SEEDS), models=list(MODELS), meta_learner="melu",
                  model_params={m: (params.get("model_params") or {}).get(m) or {} for m in MODELS})
    keep = lambda names: [m for m in names if m in MODELS]   # noqa: E731
    fair = params["fairness"]
    fair.update(models=keep(fair["models"]), counterfactual_models=keep(fair["counterfactual_models"]))
    rob = params["robustness"]
    rob["models"] = keep(rob["models"])
    rob["shilling"]["models"] = keep(rob["shilling"]["models"]) or ["svd"]
    params["feedback"]["models"] = keep(params["feedback"]["models"]) or ["melu"]
    params["determinism"] = {"model": "melu", "seed": SEEDS[0]}
    params["baseline"] = None
    if address:
        params["compute"] = {**(params.get("compute") or {}), "address": address}
    if max_per_group is not None:
        params["evaluation"]["sample"] = {"max_per_group": int(max_per_group)}
    if feedback_users is not None:
        params["feedback"]["max_users"] = int(feedback_users)
    return params


def copy_tracked(dst: Path, repo: Path = REPO) -> None:
    """The project's tracked files (`git ls-files`) into dst: what a fresh clone holds."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = repo / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _tree_sample(pid: int, cpu_seen: dict[int, float]) -> tuple[int, int]:
    """(sum of resident sets, largest single resident set) over pid and its descendants, (0, 0) once
    it is gone; records each process's CPU seconds so far (user + system) in `cpu_seen`."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = largest = 0
    for p in procs:
        try:
            with p.oneshot():
                rss, cpu = p.memory_info().rss, p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total, largest = total + rss, max(largest, rss)
        cpu_seen[p.pid] = cpu.user + cpu.system
    return total, largest


def run_measured(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path) -> tuple[int, StageCost]:
    """(exit status, cost) of one command, its output appended to `log`. CPU time and the largest
    process are the larger of wait4's (exact, but only for descendants that were reaped) and the
    polled figures (which also see a local Ray's workers: they are killed at shutdown, never reaped
    into the stage's rusage)."""
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
        peak_tree = peak_one = 0
        cpu_seen: dict[int, float] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree, one = _tree_sample(proc.pid, cpu_seen)
            peak_tree, peak_one = max(peak_tree, tree), max(peak_one, one)
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here: keep Popen from waiting again
    cpu = max(usage.ru_utime + usage.ru_stime, sum(cpu_seen.values()))
    largest = max(usage.ru_maxrss * 1024, peak_one)      # Linux reports ru_maxrss in KiB
    cost = StageCost(stage=" ".join(cmd[-1:]), wall_s=round(wall, 1), cpu_s=round(cpu, 1),
                     rss_max_gb=round(largest / GB, 2), rss_tree_gb=round(max(peak_tree, largest) / GB, 2),
                     load_1min=round(os.getloadavg()[0], 1))
    return proc.returncode, cost


def stage_names(cwd: Path, env: Mapping[str, str]) -> list[str]:
    """dvc.yaml's stages, matrix cells expanded, in file order (which is a topological order)."""
    out = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=cwd, env=dict(env), check=True,
                         capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def measure_size(size: str, workdir: Path, address: str | None = None, only: Sequence[str] = (),
                 max_per_group: int | None = None, feedback_users: int | None = None) -> dict:
    """Build the scratch project for one size and run every stage in it; returns the record saved
    as `<workdir>/<size>.json`. A failing stage ends this size (its name is recorded as `failed` and
the log's tail printed); the next size still runs. `only`: run just these stages (their inputs must
come from stages also named, earlier in dvc.yaml); the record is then not `complete`."""
    root = workdir / size
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    copy_tracked(root)
    base = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(scaling_params(base, size, address, max_per_group, feedback_users), sort_keys=False))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(root), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "CI": "1"}
    # the project's own .dvc/config comes with the copy; no git here, so DVC is told to run without it
    subprocess.run(["dvc", "config", "--local", "core.no_scm", "true"], cwd=root, env=env, check=True)
    log = root / "scaling.log"
    costs: list[StageCost] = []
    n_ratings, n_users, n_items = SIZES[size]
    record = {"size": size, "n_ratings": n_ratings, "n_users": n_users, "n_items": n_items, "address": address,
              "max_per_group": max_per_group, "feedback_users": feedback_users, "cores": os.cpu_count(),
              "complete": False, "stages": []}
    names = stage_names(root, env)
    missing = [n for n in only if n not in names]
    if missing:
        raise SystemExit(f"--stages: {missing[0]!r} is not a stage of dvc.yaml; expected some of {', '.join(names)}")
    for name in [n for n in names if not only or n in only]:
        rc, cost = run_measured(["dvc", "repro", "-s", name], root, env, log)
        if rc != 0:
            tail = log.read_text(errors="replace")[-3000:]
            print(f"{size}: stage {name} exited {rc}; the end of {log}:\n{tail}", file=sys.stderr, flush=True)
            record["failed"] = name
            break
        cost.stage = name
        costs.append(cost)
        record["stages"] = [asdict(c) for c in costs]     # saved after every stage: a cut run keeps its part
        (workdir / f"{size}.json").write_text(json.dumps(record, indent=1))
        print(f"{size} {name}: {cost.wall_s} s wall, {cost.cpu_s} s CPU, {cost.rss_max_gb} GB "
              f"(tree {cost.rss_tree_gb} GB), load {cost.load_1min}", file=sys.stderr, flush=True)
    record["complete"] = "failed" not in record and not only
    record["only"] = list(only)
    (workdir / f"{size}.json").write_text(json.dumps(record, indent=1))
    return record


def stage_command(name: str) -> list[str]:
    """The stage's module command line (dvc.yaml: `exec python -m pipelines.<stage>`, less the
    `exec`; the train matrix cell `train@<model>-<seed>` adds --model and --seed)."""
    base, _, item = name.partition("@")
    cmd = ["-m", f"pipelines.{base}"]
    if item:
        model, _, seed = item.rpartition("-")
        cmd += ["--model", model, "--seed", seed]
    return cmd


def profile_stage(size: str, name: str, workdir: Path, top: int = 25) -> Path:
    """Re-run one stage of a measured size under cProfile; prints its top functions, returns the file."""
    import pstats

    root = workdir / size
    out = workdir / f"{size}-{name.replace('@', '_')}.prof"
    env = {**os.environ, "PYTHONPATH": str(root), "CI": "1"}
    module, args = stage_command(name)[1], stage_command(name)[2:]
    # one process: jobs on Ray workers would run outside the profile
    code = (f"import os, sys, cProfile, runpy; os.cpu_count = lambda: 1; sys.argv = [{module!r}, *{args!r}]; "
            f"cProfile.run('runpy.run_module({module!r}, run_name=\"__main__\", alter_sys=True)', {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"## {size} {name}: top {top} by cumulative time", flush=True)
    pstats.Stats(str(out)).sort_stats("cumulative").print_stats(top)
    return out


PROJECT_DIRS = ("metarec/", "audit/", "pipelines/")


def _project_times(path: Path) -> dict[str, float]:
    """Cumulative seconds per project function of a profile, keyed `module/file.py:line(name)`
    (paths cut at the project folder, so two scratch projects' profiles line up)."""
    import pstats

    out: dict[str, float] = {}
    for (file, line, func), (_, _, _, cum, _) in pstats.Stats(str(path)).stats.items():  # type: ignore[attr-defined]
        cut = min((file.find(d) for d in PROJECT_DIRS if d in file), default=-1)
        if cut >= 0:
            out[f"{file[cut:]}:{line}({func})"] = out.get(f"{file[cut:]}:{line}({func})", 0.0) + cum
    return out


def growth_table(small: Path, big: Path, factor: float, min_seconds: float = 2.0, most: int = 30) -> str:
    """Project functions taking at least `min_seconds` in the bigger profile, with their cumulative
    seconds in both and the ratio; `superlinear` marks those growing faster than the data (`factor`)."""
    a, b = _project_times(small), _project_times(big)
    rows = sorted(((k, a.get(k, 0.0), v) for k, v in b.items() if v >= min_seconds), key=lambda r: -r[2])[:most]
    lines = ["| function | small s | big s | ratio | |", "|---|---|---|---|---|"]
    for k, x, y in rows:
        ratio = y / x if x > 0 else float("inf")
        lines.append(f"| `{k}` | {x:.1f} | {y:.1f} | {ratio:.1f}x | {'superlinear' if ratio > factor else ''} |")
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.1f}x" if a > 0 else "-"


def markdown_table(records: Sequence[Mapping]) -> str:
    """One row per stage (and a total): per size the wall time, CPU time and peak RSS (largest
    process), and between each size and the previous one the ratios of wall and of CPU time. CPU
    time is the steadier measure of growth on a shared machine (others' load stretches wall time)."""
    sizes = [r["size"] for r in records]
    by = [{c["stage"]: c for c in r["stages"]} for r in records]
    stages = list(dict.fromkeys(name for r in records for name in (c["stage"] for c in r["stages"])))
    head = ["stage"]
    for i, s in enumerate(sizes):
        head += [f"{s} wall s", f"{s} CPU s", f"{s} peak RSS GB"]
        if i:
            head += [f"{sizes[i - 1]}->{s} wall", f"{sizes[i - 1]}->{s} CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # totals over the stages every size measured (a cut run would otherwise compare unlike sums)
    common = [n for n in stages if all(n in b for b in by)]
    totals = [{"wall_s": sum(b[n]["wall_s"] for n in common), "cpu_s": sum(b[n]["cpu_s"] for n in common),
               "rss_max_gb": max((b[n]["rss_max_gb"] for n in common), default=0.0)} for b in by]
    label = "**all stages**" if common == stages else f"**the {len(common)} stages measured at every size**"
    for name, rows in [*[(n, [b.get(n) for b in by]) for n in stages], (label, totals)]:
        cells = [name]
        for i, c in enumerate(rows):
            cells += ["-"] * 3 if c is None else [f"{c['wall_s']:.1f}", f"{c['cpu_s']:.1f}", f"{c['rss_max_gb']:.2f}"]
            if i:
                prev = rows[i - 1]
                cells += (["-"] * 2 if c is None or prev is None else
                          [_ratio(prev["wall_s"], c["wall_s"]), _ratio(prev["cpu_s"], c["cpu_s"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reused(saved: Path, address: str | None, max_per_group: int | None, feedback_users: int | None = None) -> dict:
    """A saved size's record, refused when it was measured under another configuration than the
    one asked for (a table mixing sampled and unsampled sizes would show ratios of nothing)."""
    record = json.loads(saved.read_text())
    asked = {"address": address, "max_per_group": max_per_group, "feedback_users": feedback_users}
    for key, want in asked.items():
        if record.get(key) != want:
            raise SystemExit(f"--reuse: {saved} was measured with {key}={record.get(key)!r}, not {want!r}; "
                             f"run without --reuse or with another --workdir")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100k,1m,10m", help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/metarec-scaling"),
                   help="scratch projects and <size>.json results go here")
    p.add_argument("--address", default=None, help="a Ray cluster (written as compute.address into params.yaml)")
    p.add_argument("--reuse", action="store_true",
                   help="take sizes already measured in --workdir from their JSON (a cut run's stages too)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--stages", default="", help="comma-separated stages to measure (default: all); e.g. the "
                   "data-bound ones at a size too large to run whole: prepare,tasks,provenance")
    p.add_argument("--profile", default="", help="comma-separated stages to re-run under cProfile at every size")
    p.add_argument("--max-per-group", type=int, default=None,
                   help="evaluate a stratified sample of at most N users per group and scenario (evaluation.sample)")
    p.add_argument("--feedback-users", type=int, default=None,
                   help="simulate a seeded simple random sample of at most N users in the feedback stage "
                        "(feedback.max_users)")
    args = p.parse_args(argv)
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown size {unknown[0]!r}; expected some of {', '.join(SIZES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    records = []
    for size in sizes:
        saved = args.workdir / f"{size}.json"
        records.append(reused(saved, args.address, args.max_per_group, args.feedback_users)
                       if args.reuse and saved.exists()
                       else measure_size(size, args.workdir, args.address,
                                         [n.strip() for n in args.stages.split(",") if n.strip()],
                                         args.max_per_group, args.feedback_users))
    table = markdown_table(records)
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    profiled = [s.strip() for s in args.profile.split(",") if s.strip()]
    for size in sizes:
        for name in profiled:
            profile_stage(size, name, args.workdir)
    for name in profiled:
        for small, big in zip(sizes, sizes[1:]):
            print(f"## {name}: {small} -> {big}, project functions by cumulative time")
            print(growth_table(*(args.workdir / f"{s}-{name.replace('@', '_')}.prof" for s in (small, big)),
                               factor=SIZES[big][0] / SIZES[small][0]), end="")


if __name__ == "__main__":
    main()
