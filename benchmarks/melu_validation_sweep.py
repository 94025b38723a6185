"""MeLU hyperparameters against the baselines, on validation users only (never a test scenario).

Why: the issue asks for MeLU within 3% of the best baseline on user_cold with hyperparameters chosen
on validation users; where it falls short, this is the investigation. It fits MeLU under one seed
for the default configuration and one change at a time (local and global step sizes, local steps,
order, the training-support cap, resampling, network widths, meta-batch size), and the strongest
baselines, and prints validation MAE (after adaptation on each validation user's support set), the
best epoch, and the default's learning curve. It reads the task splits of `dvc repro tasks`
(data/prepared, data/tasks).

Run: `python benchmarks/melu_validation_sweep.py [--seed 0] [--only default,local_lr=0.1]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metarec.models import registry  # noqa: E402
from metarec.models.training import mae  # noqa: E402
from metarec.seeding import seed_everything  # noqa: E402
from pipelines.common import load_encoder, load_prepared, load_split  # noqa: E402

# One change at a time from MeLU's defaults (metarec/models/melu.py).
CHANGES: dict[str, dict] = {
    "default": {},
    "local_lr=0.01": {"local_lr": 0.01},
    "local_lr=0.1": {"local_lr": 0.1},
    "local_steps=1": {"local_steps": 1},
    "local_steps=3": {"local_steps": 3},
    "global_lr=5e-4": {"global_lr": 5e-4},
    "global_lr=3e-3": {"global_lr": 3e-3},
    "order=second": {"order": "second"},
    "train_support=None": {"train_support": None},
    "resample=False": {"resample": False},
    "adapt output layer only": {"adapt_layers": [-1]},
    "weight_decay=1e-4": {"weight_decay": 1e-4},
    "epochs=60+patience=10": {"epochs": 60, "patience": 10},
    "epochs=60+patience=10+train_support=None": {"epochs": 60, "patience": 10, "train_support": None},
    "global_lr=2e-3": {"global_lr": 2e-3},
    "embedding_dim=16": {"embedding_dim": 16},
    "embedding_dim=64": {"embedding_dim": 64},
    "hidden=128-64": {"hidden": [128, 64]},
    "meta_batch_size=16": {"meta_batch_size": 16},
    "local_lr=0.03": {"local_lr": 0.03},
    "weight_decay=1e-3": {"weight_decay": 1e-3},
    "local_steps=10": {"local_steps": 10},
    "local_steps=10+local_lr=0.025": {"local_steps": 10, "local_lr": 0.025},
    "meta_batch_size=64": {"meta_batch_size": 64},
}
BASELINES = ("itemknn", "svd", "bias", "finetune", "mean")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    args = ap.parse_args(argv)
    data = load_prepared()
    encoder = load_encoder()
    train, val = load_split("train", data), load_split("val", data)
    pairs = val.tasks_with_truth()
    tasks, truth = [t for t, _ in pairs], [y for _, y in pairs]
    print(f"{len(train)} training users, {len(val)} validation users, seed {args.seed}")
    names = list(CHANGES) if args.only is None else [n.strip() for n in args.only.split(",")]
    rows, curve = [], None
    for name in names:
        seed_everything(args.seed)
        t0 = time.perf_counter()
        model = registry.build("melu", CHANGES[name], args.seed)
        model.fit(train, val, encoder)
        score = mae(model.predict(tasks), truth)
        rows.append((f"melu {name}", score, model.best_epoch_, time.perf_counter() - t0))
        if name == "default":
            curve = registry.history(model)
        print(f"{rows[-1][0]:<34}val MAE {score:.4f}  best epoch {model.best_epoch_:>3}  {rows[-1][3]:.0f}s", flush=True)
    for name in BASELINES:
        seed_everything(args.seed, torch_too=name not in registry.CLASSIC)
        t0 = time.perf_counter()
        model = registry.build(name, {}, args.seed)
        model.fit(train, val, encoder)
        rows.append((name, mae(model.predict(tasks), truth), None, time.perf_counter() - t0))
        print(f"{name:<34}val MAE {rows[-1][1]:.4f}", flush=True)
    best_base = min(r[1] for r in rows if not r[0].startswith("melu"))
    print("\nsorted (validation MAE; relative to the best baseline)")
    for label, score, epoch, _ in sorted(rows, key=lambda r: r[1]):
        print(f"  {label:<34}{score:.4f}  {100 * (score / best_base - 1):+6.1f}%"
              + (f"  best epoch {epoch}" if epoch is not None else ""))
    if curve:
        print("\nlearning curve of the default (train loss = query MSE after adaptation; val = MAE)")
        for r in curve:
            print(f"  epoch {r['epoch']:>3}  train {r['train_loss']:.4f}  val {r['val_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
