"""One seed drives everything: Python, NumPy and torch generators, and deterministic kernels."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEFAULT_THREADS = 2


def seed_everything(seed: int, threads: int = DEFAULT_THREADS) -> dict:
    """Seed all generators, force deterministic algorithms and fix the thread count.

    Returns what was set, so that it can be recorded next to the results.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    return {"seed": int(seed), "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def rng(seed: int, *stream: int | str) -> np.random.Generator:
    """An independent NumPy generator for one named purpose under one seed."""
    words = [seed] + [s if isinstance(s, int) else int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") for s in stream]
    return np.random.default_rng(np.random.SeedSequence(words))
