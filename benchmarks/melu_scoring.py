"""MeLU's catalogue scoring with and without each of its two cost cuts, alternated in one process.

Why alternated: the machine is shared and its speed drifts by tens of percent within minutes, so
old and new run turn about and the medians are compared. Fits MeLU for one epoch on a
MovieLens-1M-shaped synthetic set (3,706 items), takes `--tasks` warm and user-cold users with every
item they did not rate as candidates, and times `model.predict` with:

- `fold`: `gram.fold_query` forced off (the shared first-layer product plus the Gram correction
  per candidate) against the real predicate (the update folded into per-task item weights);
- `order`: `chunk_by_rows` without its `then` (tasks of equal length grouped as they come) against
  the real one (ties ordered by support length).

Prints each repetition, the medians, the speed-up and the largest prediction difference:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/melu_scoring.py --tasks 256 --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def build(n_tasks: int):
    """A one-epoch MeLU and `n_tasks` catalogue tasks (every unrated item a candidate)."""
    from metarec.data.load import load_dataset
    from metarec.features import FeatureEncoder
    from metarec.models.melu import MeLU
    from metarec.splits import SplitConfig, build_splits
    from metarec.tasks import TaskSet

    data = load_dataset({"source": "synthetic", "synthetic": {
        "seed": 0, "n_users": 1200, "n_items": 3706, "n_ratings": 120_000, "effects": []}}, log=lambda _: None)
    splits = build_splits(data, SplitConfig())
    sets = {s: TaskSet(f, data.users, data.items) for s, f in splits.items()}
    train = splits["train"]
    enc = FeatureEncoder.fit(data.spec, data.users, data.items, train.user_id.unique(), train.item_id.unique())
    model = MeLU(epochs=1, threads=1, seed=0).fit(sets["train"], sets["val"], enc)
    items = np.sort(data.items.item_id.to_numpy(np.int64))
    pool = [t for s in ("warm", "user_cold") for t in sets[s].tasks()][:n_tasks]
    return model, [t.replace(candidates=np.setdiff1d(items, t.support_items)) for t in pool]


def compare(model, tasks, reps: int, name: str, switch) -> None:
    """Alternate `switch(False)` (without the cut) and `switch(True)` (with it) for `reps` rounds."""
    times: dict[bool, list[float]] = {False: [], True: []}
    preds: dict[bool, list[np.ndarray]] = {}
    for rep in range(reps):
        for on in (False, True):
            switch(on)
            t0 = time.perf_counter()
            preds[on] = model.predict(tasks)
            times[on].append(time.perf_counter() - t0)
        print(f"{name} rep {rep}: without {times[False][-1]:.3f} s, with {times[True][-1]:.3f} s", flush=True)
    switch(True)
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(preds[False], preds[True]))
    print(f"{name}: median without {without:.3f} s, with {with_:.3f} s, speed-up {without / with_:.2f}x, "
          f"max |prediction difference| {diff:.2g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    from metarec.models import gram, training

    torch.manual_seed(0)
    model, tasks = build(args.tasks)
    sizes = [len(t.candidates) for t in tasks]
    print(f"{len(tasks)} tasks, candidates {min(sizes)} to {max(sizes)}, torch threads 1")
    model.predict(tasks[:8])                          # warm-up
    fold, chunks = gram.fold_query, training.chunk_by_rows
    compare(model, tasks, args.reps, "fold",
            lambda on: setattr(gram, "fold_query", fold if on else (lambda *a: False)))
    compare(model, tasks, args.reps, "order", lambda on: setattr(
        training, "chunk_by_rows", chunks if on else (lambda lengths, rows, n, then=None: chunks(lengths, rows, n))))


if __name__ == "__main__":
    main()
