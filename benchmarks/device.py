"""MeLU on the CPU and on a GPU: wall time of meta-training and scoring, and how far apart the
predictions land.

Why: the torch models take `device: auto | cpu | cuda` (`metarec/models/device.py`); this says
what a GPU buys on the audit's own data and how its numbers compare with the CPU's (close, not
bitwise equal: docs/PERFORMANCE.md, "GPU"). It reads the task splits of `dvc repro tasks`
(data/prepared, data/tasks under `--root`) and, per device, with the same seed: fits MeLU on the
training users with validation-based early stopping, then times (a) query scoring of every
user_cold task and (b) catalogue scoring, every user_cold user against the whole item table, the
batched path the catalogue metrics and the counterfactual test take. Every timing is wall time
after a warm-up that starts CUDA, so the GPU's one-off start is reported on its own line. The
last column compares each device's predictions with the first device's.

Run: `python benchmarks/device.py [--root .] [--devices cpu,cuda] [--epochs 10] [--threads 2]`
(default devices: cpu, and cuda when torch sees one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from metarec.models.melu import MeLU  # noqa: E402
from metarec.models.training import mae  # noqa: E402
from metarec.prepared import load_encoder, load_prepared, load_split  # noqa: E402
from metarec.seeding import seed_everything  # noqa: E402


def _timed(fn):
    """(result, wall seconds), with the GPU's queue drained before the clock stops."""
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="directory holding data/prepared and data/tasks")
    ap.add_argument("--devices", default=None, help="comma-separated: cpu, cuda (default: cpu, and cuda if present)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    prepared, tasks_dir = args.root / "data" / "prepared", args.root / "data" / "tasks"
    if not (prepared / "meta.json").is_file() or not (tasks_dir / "train.parquet").is_file():
        print(f"{args.root}: no data/prepared and data/tasks; run `dvc repro tasks` there first", file=sys.stderr)
        return 2
    data = load_prepared(prepared)
    encoder = load_encoder(tasks_dir)
    train, val = load_split("train", data, tasks_dir), load_split("val", data, tasks_dir)
    cold = load_split("user_cold", data, tasks_dir).tasks_with_truth()
    queries, truth = [t for t, _ in cold], [y for _, y in cold]
    catalogue = np.asarray(encoder.item_ids, dtype=np.int64)
    full = [t.replace(candidates=catalogue) for t in queries]
    print(f"ML-100K splits under {args.root}: {len(train)} training users, {len(val)} validation, "
          f"{len(queries)} user_cold; catalogue {len(catalogue)} items; MeLU epochs <= {args.epochs}, "
          f"seed {args.seed}, {args.threads} CPU threads, torch {torch.__version__}")
    if "cuda" in devices:
        _, start = _timed(lambda: torch.zeros(1, device="cuda") + 1)
        print(f"cuda: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; start-up {start:.1f}s (not counted below)")
    print(f"{'device':<8}{'fit s':>8}{'epochs':>8}{'s/epoch':>9}{'query s':>9}{'catalogue s':>13}"
          f"{'pairs/s':>11}{'cold MAE':>10}{'max |diff|':>12}")
    first: np.ndarray | None = None
    for device in devices:
        seed_everything(args.seed, args.threads)
        model = MeLU(epochs=args.epochs, seed=args.seed, threads=args.threads, device=device)
        _, fit_s = _timed(lambda: model.fit(train, val, encoder))
        preds, query_s = _timed(lambda: model.predict(queries))
        scores, cat_s = _timed(lambda: model.predict(full))
        flat = np.concatenate(scores)
        diff = "" if first is None else f"{np.abs(flat - first).max():.2e}"
        first = flat if first is None else first
        epochs = len(model.history_)
        print(f"{device:<8}{fit_s:>8.1f}{epochs:>8}{fit_s / max(epochs, 1):>9.2f}{query_s:>9.2f}{cat_s:>13.2f}"
              f"{flat.size / cat_s:>11.3g}{mae(preds, truth):>10.4f}{diff:>12}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
