"""Where a torch model computes: the `device` hyperparameter (`auto`, `cpu` or `cuda`).

Why one module: every torch model (MeLU, GlobalModel, FineTune, the ensemble's learners) takes the
same option, checks it with the same sentence and moves its tensors the same way. The rule is the
same everywhere: parameters are *initialised* on the CPU with the CPU generator (so a seed gives the
same starting weights on every device), then moved; training and scoring run on the resolved
device; results leave as CPU NumPy arrays and weights are saved as CPU tensors, so a model saved
on a GPU loads anywhere. On the CPU every move is a no-op (`Tensor.to` returns the tensor itself),
which is why CPU results are bitwise those of the code before this option existed (tested).

`auto` is CUDA when `torch.cuda.is_available()` and the CPU otherwise; `cuda` on a machine without
a CUDA device is a configuration error rather than a silent fallback, because a run that asked for
the GPU and got the CPU would be slower than planned and not the numbers that were asked for.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarec.errors import ConfigError
from metarec.models.base import CONFIG
from metarec.tasks import Batch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(model: str, value: Any) -> torch.device:
    """The torch device `model_params.<model>.device = value` means on this machine.

    CUDA resolves to the current CUDA device with its index (`cuda:0`), so that it compares equal
    to the device of tensors placed there. ConfigError (one sentence naming the key) for a value
    other than auto, cpu or cuda, and for cuda where no CUDA device is available.
    """
    if not isinstance(value, str) or value not in DEVICES:
        raise ConfigError(f"model_params.{model}.device: expected auto, cpu or cuda, got {value!r}")
    cuda = torch.cuda.is_available()
    if value == "cuda" and not cuda:
        raise ConfigError(f"model_params.{model}.device: cuda was asked for, but no CUDA device is available "
                          f"on this machine (torch.cuda.is_available() is False); use auto or cpu")
    if value == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def device_record(device: torch.device) -> dict[str, str | None]:
    """{"device": "cuda:0" or "cpu", "name": the GPU's name or None}: what a model records about
    where it was fitted (config.json `fitted_on`, the reproducibility fingerprint)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "name": name}


def saved_device(directory: str | Path) -> dict[str, str | None] | None:
    """The `fitted_on` record (`device_record`) of a model saved in `directory`: None when the
    directory holds no config.json, or a model that keeps no such record (the classic models run
    no torch; models saved before the option existed did not write one)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return None
    record = json.loads(path.read_text()).get("fitted_on")
    return dict(record) if isinstance(record, dict) else None


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The padded batch with every tensor on `device` (the same batch, no copy, when already there)."""
    moved = [getattr(batch, f.name).to(device) for f in fields(Batch)]
    if all(m is getattr(batch, f.name) for m, f in zip(moved, fields(Batch))):
        return batch
    return Batch(*moved)


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array, copied to the host when it lives on an accelerator."""
    return tensor.detach().cpu().numpy()
