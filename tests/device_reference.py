"""CPU predictions of every torch model on the tiny fixture, saved before the `device` option existed.

`tests/test_device.py` holds today's code to these numbers: adding a device (and running on the
CPU, whether `device` is unset or "cpu") must not change a single bit of a CPU result. The file
was written by the code before that change (`python -m tests.device_reference` regenerates it,
which is only right when a change is *meant* to alter CPU results); `fingerprint` records the
software and hardware it was computed on, because float results are only bitwise stable on the
same CPU kernels and torch release.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

REFERENCE = Path(__file__).with_name("data") / "device_cpu_reference.npz"
FINGERPRINT = REFERENCE.with_suffix(".json")

NET = dict(embedding_dim=8, hidden=(16, 16), threads=1)

# name -> (class path, hyperparameters): first- and second-order MeLU (the second with a support cap
# and partial adaptation, so both local-update forms run), the two transfer baselines, and the
# ensemble with MLP base learners (random initialisation included).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "melu": ("metarec.models.melu:MeLU",
             dict(NET, epochs=3, patience=100, meta_batch_size=16, global_lr=1e-2, seed=5)),
    "melu_second": ("metarec.models.melu:MeLU",
                    dict(NET, epochs=2, patience=100, meta_batch_size=16, global_lr=1e-2, seed=2, order="second",
                         adapt_layers=(1, 2), max_support=8, train_support=None)),
    "global": ("metarec.models.transfer:GlobalModel", dict(NET, epochs=3, batch_size=64, global_lr=1e-2, seed=1)),
    "finetune": ("metarec.models.transfer:FineTune",
                 dict(NET, epochs=3, batch_size=64, global_lr=1e-2, steps=3, lr=0.05, seed=1)),
    "ensemble": ("metarec.models.ensemble:SupportSetEnsemble",
                 dict(group_by="cluster", n_clusters=5, hidden=8, emb_dim=4, max_epochs=20, seed=1)),
}


def model_class(path: str) -> Callable[..., Any]:
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def predictions(name: str, **extra: Any) -> np.ndarray:
    """Fit one reference configuration on the tiny fixture (plus `extra` hyperparameters) and return
    its predictions of the validation tasks, concatenated (float64)."""
    from tests.helpers_tiny import make_tiny

    tiny = make_tiny(seed=0, n_train=64, n_val=16)
    path, params = CONFIGS[name]
    model = model_class(path)(**params, **extra).fit(tiny.train, tiny.val, tiny.encoder)
    return np.concatenate(model.predict(tiny.val.tasks())).astype(np.float64)


def fingerprint() -> dict[str, str]:
    """What bitwise equality of CPU floats depends on: torch release, the CPU kernels it picks, the CPU."""
    import torch

    from audit.fingerprint import _cpu_model

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": _cpu_model(), "machine": platform.machine()}


def main() -> None:
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez(REFERENCE, **{name: predictions(name) for name in CONFIGS})
    FINGERPRINT.write_text(json.dumps(fingerprint(), indent=2) + "\n")
    print(f"wrote {REFERENCE} and {FINGERPRINT}")


if __name__ == "__main__":
    main()
