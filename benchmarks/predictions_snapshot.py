"""Every built-in model's predictions on the tiny test fixture, to show a refactor changed none of them.

Why: a change to the model classes (their base, parameters, persistence) must leave predictions
bit for bit as they were. This fits each model (a few configurations of the neural ones and the
ensemble) on `tests.helpers_tiny.make_tiny()`, predicts the validation tasks and five training
tasks, does the same after a save/load round trip, keeps the training-loss history, and writes
all of it to one .npz; `--compare` then lists every array that is not identical.

Run on the old tree and on the new one, then compare:
  `PYTHONPATH=<tree> python benchmarks/predictions_snapshot.py before.npz` (likewise after.npz)
  `python benchmarks/predictions_snapshot.py --compare before.npz after.npz`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

NEURAL = {"embedding_dim": 4, "hidden": (8, 8), "epochs": 3, "threads": 1}
CASES = {
    "melu": ("melu", {**NEURAL, "meta_batch_size": 8}),
    "melu_second_order": ("melu", {**NEURAL, "meta_batch_size": 8, "order": "second", "adapt_layers": (-1,),
                                   "resample": False}),
    "global": ("global", {**NEURAL, "batch_size": 32}),
    "finetune": ("finetune", {**NEURAL, "batch_size": 32, "steps": 2}),
    "ensemble_user_weighted": ("ensemble", {"group_by": "user", "combine": "weighted", "max_epochs": 20}),
    "ensemble_cluster_mlp": ("ensemble", {"n_clusters": 4, "max_epochs": 20, "hidden": 4}),
    "mean": ("mean", {}), "bias": ("bias", {}), "pop": ("pop", {"shrinkage": 3}),
    "itemknn": ("itemknn", {}), "svd": ("svd", {"n_epochs": 5}),
}


def snapshot(out: Path, seed: int = 7) -> None:
    from metarec.models import registry
    from tests.helpers_tiny import make_tiny

    tiny = make_tiny()
    tasks = tiny.val.tasks() + tiny.train.tasks()[:5]
    arrays: dict[str, np.ndarray] = {}
    for key, (name, params) in CASES.items():
        model = registry.build(name, params, seed)
        if hasattr(registry, "fit"):   # trees before the estimator base fitted through the registry
            registry.fit(model, tiny.train, tiny.val, tiny.encoder)
        else:
            model.fit(tiny.train, tiny.val, tiny.encoder)
        arrays[key] = np.concatenate(model.predict(tasks))
        with tempfile.TemporaryDirectory() as d:
            model.save(d)
            arrays[f"{key}.loaded"] = np.concatenate(registry.load(name, d, train=tiny.train).predict(tasks))
        arrays[f"{key}.history"] = np.array([h["train_loss"] for h in registry.history(model)], dtype=np.float64)
    np.savez(out, **arrays)
    print(f"{out}: {len(arrays)} arrays")


def compare(a: Path, b: Path) -> int:
    x, y = np.load(a), np.load(b)
    keys = sorted(set(x.files) | set(y.files))
    differ = [k for k in keys if k not in x.files or k not in y.files or not np.array_equal(x[k], y[k])]
    print(f"{len(keys) - len(differ)} of {len(keys)} arrays identical" + (f"; differ: {differ}" if differ else ""))
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, help="the .npz to write")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("give the .npz to write, or --compare BEFORE AFTER")
    snapshot(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
