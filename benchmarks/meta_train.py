"""Milliseconds per MeLU meta-batch: the vectorised step over all the tasks of the batch, with the
local update in closed form (`inner="gram"`, MeLU's default: batched matmuls, `gram.py`) and through
`torch.func.grad` under `vmap` (`inner="autograd"`, the reference form), against a plain per-task
Python loop of the same math (`loop_meta_gradient`), each followed by the same Adam step. The
ratio columns divide the loop's and the vmap form's time by the closed form's. The three are timed
in interleaved rounds and the medians printed, so that a shared machine's drift cannot favour one.

Two inputs:
(a) tasks built straight from the ML-100K files (u.data, u.user, u.item) when they are found
    (env METAREC_ML100K, else ../shared/datasets/ml-100k relative to the repository);
(b) synthetic tasks with MeLU's MovieLens-1M input shapes: items rate (6), genre (25,
    multi-label), director (2,186, up to 3), actor (8,030, up to 10); users gender (2), age (7),
    occupation (21), zip (3,402); embedding 32, hidden 64-64.
32 tasks per meta-batch, support sizes uniform in 3..90, query 10; 1 and 5 local steps; first- and
second-order. Run: `python benchmarks/meta_train.py [--threads 2] [--batches 8] [--rounds 5]
[--groups G]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metarec.data.schema import MOVIELENS_SPEC  # noqa: E402
from metarec.features import FeatureEncoder  # noqa: E402
from metarec.models.melu import DEFAULT_GROUPS, loop_meta_gradient, meta_gradient  # noqa: E402
from metarec.models.network import NetworkSpec, RatingNetwork, dense_names  # noqa: E402
from metarec.models.training import slice_batch  # noqa: E402
from metarec.seeding import seed_everything  # noqa: E402
from metarec.tasks import Batch, TaskSet, make_batch  # noqa: E402

META_BATCH = 32
QUERY = 10
SUPPORT = (3, 90)


# ------------------------------------------------------------------------------------------ inputs
def ml100k_dir() -> Path | None:
    env = os.environ.get("METAREC_ML100K")
    for cand in ([Path(env)] if env else []) + [ROOT / ".." / "shared" / "datasets" / "ml-100k"]:
        if (cand / "u.data").exists() and (cand / "u.user").exists() and (cand / "u.item").exists():
            return cand
    return None


def ml100k_batches(path: Path, n_batches: int, seed: int = 0) -> tuple[RatingNetwork, list[Batch]]:
    """One task per user: query = the latest 10 ratings, support = a uniform 3..90 of the ones before."""
    ratings = pd.read_csv(path / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    users = pd.read_csv(path / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"],
                        dtype={"zip": str})
    genre_names = [g.split("|")[0] for g in (path / "u.genre").read_text(encoding="latin-1").splitlines() if g]
    items = pd.read_csv(path / "u.item", sep="|", header=None, encoding="latin-1")
    flags = items.iloc[:, 5:5 + len(genre_names)].to_numpy()
    items = pd.DataFrame({
        "item_id": items[0].astype(np.int64),
        "genres": ["|".join(g for g, f in zip(genre_names, row) if f) for row in flags],
        "release_year": pd.to_datetime(items[2], format="%d-%b-%Y", errors="coerce").dt.year.astype(float),
    })
    g = np.random.default_rng(seed)
    rows = []
    for tid, (uid, r) in enumerate(ratings.sort_values(["user_id", "timestamp", "item_id"]).groupby("user_id")):
        if len(r) < QUERY + SUPPORT[0]:
            continue
        n_s = min(int(g.integers(SUPPORT[0], SUPPORT[1] + 1)), len(r) - QUERY)
        part = r.iloc[len(r) - QUERY - n_s:].assign(task_id=tid, scenario="train",
                                                    role=["support"] * n_s + ["query"] * QUERY)
        rows.append(part)
    frame = pd.concat(rows, ignore_index=True)
    encoder = FeatureEncoder.fit(MOVIELENS_SPEC, users, items, users["user_id"], items["item_id"])
    pairs = TaskSet(frame, users, items).tasks_with_truth()
    big = make_batch([t for t, _ in pairs], encoder, [y for _, y in pairs])
    spec = NetworkSpec.from_encoder(encoder, 32, (64, 64))
    item_x, item_ml = encoder.item_tensors()
    net = RatingNetwork(spec, item_x, item_ml, generator=torch.Generator().manual_seed(seed))
    net.set_output_bias(float(ratings["rating"].mean()))
    order = g.permutation(len(big))
    batches = [slice_batch(big, order[i * META_BATCH:(i + 1) * META_BATCH]) for i in range(n_batches)]
    return net, batches


def _ml_table(g: np.random.Generator, n_items: int, vocab: int, max_labels: int) -> torch.Tensor:
    """Multi-label table: 1..max_labels known labels per item (indices 2..vocab+1), padded with 0."""
    table = np.zeros((n_items, max_labels), dtype=np.int64)
    for i in range(n_items):
        k = int(g.integers(1, max_labels + 1))
        table[i, :k] = g.choice(vocab, k, replace=False) + 2
    return torch.from_numpy(table)


def synthetic_batches(n_batches: int, seed: int = 0, n_items: int = 3706) -> tuple[RatingNetwork, list[Batch]]:
    """Random tasks with MeLU's MovieLens-1M feature cardinalities."""
    g = np.random.default_rng(seed)
    user_vocab = (2, 7, 21, 3402)
    spec = NetworkSpec(user_cardinalities=tuple(v + 1 for v in user_vocab), item_cardinalities=(6 + 1,),
                       multilabel_cardinalities=(25 + 2, 2186 + 2, 8030 + 2), embedding_dim=32, hidden=(64, 64))
    item_x = torch.from_numpy(g.integers(1, 7, (n_items, 1)))
    item_ml = [_ml_table(g, n_items, 25, 3), _ml_table(g, n_items, 2186, 3), _ml_table(g, n_items, 8030, 10)]
    net = RatingNetwork(spec, item_x, item_ml, generator=torch.Generator().manual_seed(seed))
    net.set_output_bias(3.6)
    batches = []
    for _ in range(n_batches):
        sizes = g.integers(SUPPORT[0], SUPPORT[1] + 1, META_BATCH)
        S = int(sizes.max())
        s_mask = torch.from_numpy(np.arange(S)[None, :] < sizes[:, None])
        s_items = torch.from_numpy(g.integers(0, n_items, (META_BATCH, S))) * s_mask
        s_y = torch.from_numpy(g.integers(1, 6, (META_BATCH, S)).astype(np.float32)) * s_mask
        user_x = torch.from_numpy(np.stack([g.integers(1, v + 1, META_BATCH) for v in user_vocab], axis=1))
        batches.append(Batch(user_x, s_items, s_y, s_mask,
                             torch.from_numpy(g.integers(0, n_items, (META_BATCH, QUERY))),
                             torch.from_numpy(g.integers(1, 6, (META_BATCH, QUERY)).astype(np.float32)),
                             torch.ones(META_BATCH, QUERY, dtype=torch.bool)))
    return net, batches


# ------------------------------------------------------------------------------------------ timing
def time_steps(fn: Callable, net: RatingNetwork, batches: list[Batch], n: int, steps: int, first_order: bool,
               groups: int = 1, inner: str = "gram", local_lr: float = 0.05) -> float:
    """ms per meta-batch (gradient + Adam step) over n batches, after one untimed warm-up batch."""
    params = {k: p.detach().clone() for k, p in net.params().items()}
    buffers = net.buffers_dict()
    adapt = dense_names(net.spec)
    opt = torch.optim.Adam(params.values(), lr=1e-3, fused=True)

    def step(b: Batch) -> None:
        grads, _ = fn(params, buffers, net.spec, b, adapt, local_lr, steps, first_order, groups, inner)
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()

    step(batches[0])
    t0 = time.perf_counter()
    for i in range(n):
        step(batches[(i + 1) % len(batches)])
    return (time.perf_counter() - t0) / n * 1000.0


def interleaved(net: RatingNetwork, batches: list[Batch], steps: int, first_order: bool, groups: int,
                args) -> tuple:
    """(closed-form ms, torch.func vmap ms, loop ms, loop/closed-form ratios, vmap/closed-form
    ratios): medians over `args.rounds` rounds, each round timing all three back to back, so that
    drift in the machine's speed (a shared VM can vary by a third within minutes) falls on all of
    them alike. The ratios are the rounds' own, so their spread shows how sure each figure is."""
    times: list[list[float]] = [[], [], []]
    for _ in range(args.rounds):
        times[0].append(time_steps(meta_gradient, net, batches, args.batches, steps, first_order, groups, "gram"))
        times[1].append(time_steps(meta_gradient, net, batches, args.batches, steps, first_order, groups,
                                   "autograd"))
        times[2].append(time_steps(loop_meta_gradient, net, batches, args.batches, steps, first_order))
    over_loop = [loop / gram for gram, _, loop in zip(*times)]
    over_vmap = [auto / gram for gram, auto, _ in zip(*times)]
    return (*(float(np.median(t)) for t in times), over_loop, over_vmap)


def _ratio(ratios: list[float]) -> str:
    """Median ratio and its spread over the rounds, e.g. '9.1x (8.7..9.3)'."""
    return f"{np.median(ratios):.1f}x ({min(ratios):.1f}..{max(ratios):.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8, help="timed meta-batches (the same ones for all three)")
    ap.add_argument("--groups", type=int, default=None,
                    help=f"support-size groups of the vectorised step (default: MeLU's, {DEFAULT_GROUPS})")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    ap.add_argument("--only", choices=["ml100k", "synthetic"], default=None)
    args = ap.parse_args(argv)
    info = seed_everything(0, args.threads)
    print(f"torch {torch.__version__}, threads {info['torch_threads']}, deterministic algorithms on, "
          f"meta-batch {META_BATCH}, support {SUPPORT[0]}..{SUPPORT[1]}, query {QUERY}, "
          f"support groups {args.groups or DEFAULT_GROUPS}; medians of {args.rounds} interleaved rounds")

    inputs: list[tuple[str, Callable[[int], tuple[RatingNetwork, list[Batch]]]]] = []
    path = ml100k_dir()
    if args.only in (None, "ml100k"):
        if path is None:
            print("ML-100K files not found (set METAREC_ML100K): skipping the real-data tasks")
        else:
            inputs.append(("ml-100k", lambda n: ml100k_batches(path, n)))
    if args.only in (None, "synthetic"):
        inputs.append(("synthetic ML-1M shapes", synthetic_batches))

    n_batches = args.batches + 1
    header = (f"{'tasks':<24}{'order':<8}{'steps':>6}{'closed-form ms':>16}{'vmap autograd ms':>18}"
              f"{'loop ms':>10}{'loop/closed (min..max)':>24}{'vmap/closed (min..max)':>24}")
    rows = []
    for name, build in inputs:
        net, batches = build(n_batches)
        groups = args.groups or DEFAULT_GROUPS
        for order in ("first", "second"):
            for steps in (1, 5):
                fo = order == "first"
                gram, auto, loop, over_loop, over_vmap = interleaved(net, batches, steps, fo, groups, args)
                rows.append(f"{name:<24}{order:<8}{steps:>6}{gram:>16.1f}{auto:>18.1f}{loop:>10.1f}"
                            f"{_ratio(over_loop):>24}{_ratio(over_vmap):>24}")
                print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
