"""One seed drives everything: Python, NumPy and torch generators, and deterministic kernels.

`seed_everything` also fixes the run-time settings that results depend on or that decide speed:
the thread count, and (on glibc) the allocator's habit of handing large blocks back to the OS.
Where CUDA is available it seeds every GPU's generator and keeps float32 matrix products in IEEE
float32 (no TF32), so that a GPU's results differ from the CPU's by rounding only; the CPU path is
untouched by any of that.
"""

from __future__ import annotations

import os
import random

import numpy as np

from metarec.memory import keep_freed_memory

# One torch thread per process, and the torch models' `threads` default to it too. Why: the audit's
# parallelism is across processes (matrix cells and compute jobs, one CPU each), and a process on
# two OpenMP threads beside another busy process waits at every parallel region for its second
# thread to be scheduled: two MeLU cells side by side on 2 cores took 550 s each, against 12 s for
# one alone on two threads (15 s on one). The thread count is fixed, not taken from the
# scheduler, because torch's reductions can round differently on another thread count.
DEFAULT_THREADS = 1


def seed_everything(seed: int, threads: int = DEFAULT_THREADS, torch_too: bool = True) -> dict:
    """Seed all generators, force deterministic algorithms and fix the thread count.

    Returns what was set, so that it can be recorded next to the results. `torch_too=False` seeds
    Python and NumPy only and leaves torch unimported (a second of start-up saved in the stages of
    models that never use it; the neural models also seed torch themselves when they fit).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    keep_freed_memory()
    if not torch_too:
        return {"seed": int(seed), "torch_threads": None, "deterministic_algorithms": None,
                "fill_uninitialized_memory": None, "cuda_seeded": None}
    import torch

    # cuBLAS needs a fixed workspace to be deterministic; read when it first starts, so set first.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    if cuda:
        # manual_seed already reaches the GPUs' generators; said explicitly, since the models draw
        # nothing on the GPU today and a future one that does must not depend on that detail.
        torch.cuda.manual_seed_all(seed)
        # TF32 products (about 1e-3 relative error) would make GPU numbers differ from the CPU's by
        # more than float32 rounding; "ieee" is torch's default, fixed here against an override.
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid against kernels that
    # read memory they never wrote; no kernel here does (the bitwise-reproducibility tests would
    # show it), and the fill, a pass over every tensor allocated, cost 4% of a MeLU meta-batch.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(threads)
    return {"seed": int(seed), "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "fill_uninitialized_memory": False, "cuda_seeded": cuda}


def rng(seed: int, *stream: int | str) -> np.random.Generator:
    """An independent NumPy generator for one named purpose under one seed."""
    words = [seed] + [s if isinstance(s, int) else int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") for s in stream]
    return np.random.default_rng(np.random.SeedSequence(words))
