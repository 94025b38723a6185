"""Milliseconds per AdamW step over an embedding table whose rows a batch rarely touches, with and
without denormals flushed (`metarec.models.training.flush_denormals`, which the network models
train under).

Each step gives a gradient to `--touched` random rows (the users of one meta-batch) and none to the
rest, as MeLU's meta-batches do for a user attribute with many values; AdamW is MeLU's (fused,
weight decay 0.01, one thread). An untouched row's first moment shrinks by beta1 = 0.9 per step: it
is a float32 denormal about 750 steps after its last gradient, and it never reaches zero (0.9 times
the smallest denormal rounds back to it). So from step 750 on, the share of denormal rows, and the
step's time, only grow, unless denormals are flushed. Printed: the median step time per window of steps, for both runs, and whether the final
weights are identical. The default table is the 10M scaling project's largest (37,715 x 32).

    PYTHONPATH=$PWD python benchmarks/adam_denormals.py [--rows 37715] [--steps 2000] [--window 250]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from metarec.models.training import flush_denormals


def run(rows: int, dim: int, touched: int, steps: int, flush: bool) -> tuple[list[float], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(rows, dim, generator=gen) * 0.05)
    opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.01, fused=True)
    times = []
    with flush_denormals() if flush else contextlib.nullcontext():
        for _ in range(steps):
            grad = torch.zeros(rows, dim)
            grad[torch.randint(rows, (touched,), generator=gen)] = torch.randn(touched, dim, generator=gen) * 1e-3
            table.grad = grad
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    return times, table.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=37715)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--touched", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--window", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(1)
    plain, w_plain = run(args.rows, args.dim, args.touched, args.steps, flush=False)
    flushed, w_flush = run(args.rows, args.dim, args.touched, args.steps, flush=True)
    print(f"AdamW over a {args.rows} x {args.dim} table, {args.touched} rows touched per step, one thread")
    print("steps        | median ms/step, denormals kept | median ms/step, flushed")
    for lo in range(0, args.steps, args.window):
        hi = min(lo + args.window, args.steps)
        print(f"{lo + 1:5d}-{hi:<6d} | {np.median(plain[lo:hi]) * 1e3:30.2f} | {np.median(flushed[lo:hi]) * 1e3:23.2f}")
    print(f"total: {sum(plain):.2f} s kept, {sum(flushed):.2f} s flushed; "
          f"final weights identical: {torch.equal(w_plain, w_flush)}")


if __name__ == "__main__":
    main()
