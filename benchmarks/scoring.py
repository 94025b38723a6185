"""Cost of the per-user steps that issue 18 made linear: splitting and catalogue scoring.

For one data set (ML-100K, or the synthetic source at N ratings with users and items scaled like
MovieLens-1M) it times, each in a fresh process so that peak RSS is the step's own:
- `split`: `build_splits` on the default task params;
- `score:<model>`: `catalogue_rankings` of every scenario for one fitted model (fitted untimed;
  classic models' query predictions are made first, untimed, as the train stage does, so the
  catalogue call reuses that fit). MeLU is trained for one epoch: scoring cost does not depend on
  how well it was trained.
Per step it prints wall seconds, CPU seconds of the process (what to compare on a shared machine:
wall time there mostly measures the other jobs), the process's peak RSS, and the RSS added while
the step ran (sampled every 5 ms). With --out DIR the split step writes the task tables and each
scoring step its lists to DIR; `--tasks DIR` makes the scoring steps read the task tables written
there instead of splitting again (the old and new splits are identical, see
tests/test_splits_reference.py), and --compare A B says whether two runs' lists are identical.

Before/after: the script calls only `build_splits`, `catalogue_rankings` and the model registry,
which the older code has too, so run it with the old tree first on the path:
  PYTHONPATH=<old tree> python benchmarks/scoring.py --ratings 1000000 --out /tmp/before
  PYTHONPATH=.          python benchmarks/scoring.py --ratings 1000000 --out /tmp/after
  python benchmarks/scoring.py --compare /tmp/before /tmp/after
(--ratings 0 is ML-100K, read through METAREC_ML100K.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

MELU = {"epochs": 1}
SVD = {"n_epochs": 5}  # scoring cost does not depend on the number of SGD epochs
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Highest resident set size seen while the block runs (a 5 ms sampling thread)."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _data(ratings: int):
    from metarec.data.load import load_dataset

    if ratings == 0:
        return load_dataset({"source": "movielens-100k", "path": os.environ.get("METAREC_ML100K")}, log=lambda _: None)
    scale = ratings / 1_000_209  # MovieLens-1M: 6,040 users, 3,706 items
    return load_dataset({"source": "synthetic", "synthetic": {
        "seed": 0, "n_users": max(100, round(6040 * scale ** 0.5)), "n_items": max(200, round(3706 * scale ** 0.5)),
        "n_ratings": ratings, "effects": []}}, log=lambda _: None)


def _step(step: str, ratings: int, out: str | None, max_users: int | None, tasks: str | None) -> dict:
    """One step in this process: {step, seconds, peak_rss_mb, added_rss_mb, ...}."""
    from metarec.splits import SplitConfig, build_splits, partition

    data = _data(ratings)
    cfg = SplitConfig()
    if step == "split":
        with PeakRss() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            splits = build_splits(data, cfg)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if out:
            Path(out, "tasks").mkdir(parents=True, exist_ok=True)
            for name, f in splits.items():
                f.to_parquet(Path(out, "tasks", f"{name}.parquet"), index=False)
        return {"step": step, "seconds": seconds, "cpu": cpu, "added_rss_mb": (mem.peak - mem.start) / 2**20,
                "users": int(data.ratings.user_id.nunique()),
                "tasks": sum(int(f.task_id.nunique()) for f in splits.values())}
    import pandas as pd

    from metarec.features import FeatureEncoder
    from metarec.models import registry
    from metarec.predict import catalogue_rankings, query_predictions
    from metarec.tasks import SCENARIOS, TaskSet

    name = step.split(":", 1)[1]
    splits = ({f.stem: pd.read_parquet(f) for f in Path(tasks, "tasks").glob("*.parquet")} if tasks
              else build_splits(data, cfg))
    sets = {s: TaskSet(f, data.users, data.items) for s, f in splits.items()}
    train = splits["train"]
    encoder = FeatureEncoder.fit(data.spec, data.users, data.items, train.user_id.unique(), train.item_id.unique())
    model = registry.build(name, {"melu": MELU, "svd": SVD}.get(name, {}), 0).fit(sets["train"], sets["val"], encoder)
    new = partition(data, cfg).new_items
    scenarios = [s for s in SCENARIOS if len(sets[s])]
    if max_users:  # score the first users of each scenario only (after the fit on the whole split)
        for s in scenarios:
            f = sets[s].frame
            sets[s] = TaskSet(f[f.user_id.isin(f.user_id.drop_duplicates()[:max_users])], data.users, data.items)
    for s in scenarios:
        query_predictions(model, sets[s])
    with PeakRss() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        lists = pd.concat([catalogue_rankings(model, sets[s], new, 10, seed=0) for s in scenarios], ignore_index=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        lists.to_parquet(Path(out) / f"{name}.parquet", index=False)
    pairs = sum(int(n) for n in lists.groupby(["scenario", "user_id"])["n_candidates"].first())
    return {"step": step, "seconds": seconds, "cpu": cpu, "added_rss_mb": (mem.peak - mem.start) / 2**20,
            "users": int(lists.user_id.nunique()), "pairs": pairs}


def _compare(a: Path, b: Path) -> int:
    import pandas as pd

    bad = 0
    for f in sorted(a.glob("*.parquet")):
        same = pd.read_parquet(f).equals(pd.read_parquet(b / f.name))
        bad += not same
        print(f"{f.stem}: {'identical' if same else 'DIFFERENT'} lists")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratings", type=int, default=1_000_000, help="synthetic ratings; 0 = MovieLens-100K")
    p.add_argument("--models", default="svd,melu")
    p.add_argument("--out", help="write each model's lists here (for --compare)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    p.add_argument("--max-users", type=int, help="score only the first N users of each scenario (MeLU at 1M: its "
                   "scoring is linear in users, and all of them take a quarter of an hour here)")
    p.add_argument("--tasks", help="read the task tables a split step wrote under this --out folder")
    p.add_argument("--steps", default="split,score", help="split, score, or both")
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compare:
        return _compare(*args.compare)
    if args.step:
        rec = _step(args.step, args.ratings, args.out, args.max_users, args.tasks)
        rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(rec))
        return 0
    label = "ML-100K" if args.ratings == 0 else f"synthetic {args.ratings:,} ratings"
    label += f", first {args.max_users} users per scenario scored" if args.max_users else ""
    print(f"{label}; code from {os.environ.get('PYTHONPATH') or 'the installed package'}")
    wanted = args.steps.split(",")
    steps = (["split"] if "split" in wanted else []) + (
        [f"score:{m}" for m in args.models.split(",") if m] if "score" in wanted else [])
    for step in steps:
        cmd = [sys.executable, __file__, "--step", step, "--ratings", str(args.ratings)] + (
            ["--out", args.out] if args.out else []) + (["--max-users", str(args.max_users)] if args.max_users else []) + (
            ["--tasks", args.tasks] if args.tasks else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(f"{step}: failed\n{run.stderr[-2000:]}")
            return 1
        r = json.loads(run.stdout.strip().splitlines()[-1])
        extra = f", {r['pairs']:,} user-candidate pairs" if "pairs" in r else f", {r['tasks']:,} tasks"
        print(f"{step:12s} {r['seconds']:8.2f} s wall {r['cpu']:8.2f} s CPU   peak RSS {r['peak_rss_mb']:7.0f} MB   "
              f"added during the step {r['added_rss_mb']:7.0f} MB   ({r['users']:,} users{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
