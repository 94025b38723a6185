"""Environment fingerprint: what a reviewer needs to know to re-run and compare numbers.

Results are not guaranteed identical across library releases, thread counts or CPUs (PyTorch's
reproducibility notes), so all of those are recorded next to the numbers; nor across devices (a
GPU's float32 results differ from the CPU's by rounding), so the CUDA devices present are too.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import sys
from pathlib import Path

from metarec.io import sha256_file

PACKAGES = ("metarec-audit", "torch", "numpy", "pandas", "scipy", "scikit-learn", "scikit-surprise", "fairlearn",
            "pyarrow", "safetensors", "dvc", "jinja2", "cryptography")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def accelerators() -> dict:
    """The CUDA side of the machine: whether torch can use a GPU, which ones, the CUDA release torch
    was built for, and the float32 matmul precision in force ("ieee" unless TF32 was let in)."""
    import torch

    available = torch.cuda.is_available()
    return {"cuda_available": available, "cuda_version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else [],
            "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision}


def environment(root: str | Path = ".") -> dict:
    import torch

    root = Path(root)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(), "accelerators": accelerators(), "packages": versions,
        "git_commit": _git_commit(root),
    }


def file_hashes(root: str | Path, paths: list[str]) -> dict[str, str | None]:
    root = Path(root)
    return {p: (sha256_file(root / p) if (root / p).is_file() else None) for p in paths}
