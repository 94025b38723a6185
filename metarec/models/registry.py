"""Model names (as in params.yaml `models`) to classes: build, fit, load, history."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

from metarec.errors import ConfigError
from metarec.features import FeatureEncoder
from metarec.tasks import TaskSet

NAMES = ("melu", "ensemble", "finetune", "global", "mean", "bias", "pop", "itemknn", "svd")
CLASSIC = ("mean", "bias", "pop", "itemknn", "svd")


def model_class(name: str) -> type:
    if name == "melu":
        from metarec.models.melu import MeLU
        return MeLU
    if name == "ensemble":
        from metarec.models.ensemble import SupportSetEnsemble
        return SupportSetEnsemble
    if name == "global":
        from metarec.models.transfer import GlobalModel
        return GlobalModel
    if name == "finetune":
        from metarec.models.transfer import FineTune
        return FineTune
    if name in CLASSIC:
        from metarec.models import classic
        return type(classic.build(name))
    raise ConfigError(f"unknown model {name!r}; expected one of {', '.join(NAMES)}")


def build(name: str, params: Mapping[str, Any] | None, seed: int) -> Any:
    """A fresh, unfitted model with the given hyperparameters and seed."""
    params = dict(params or {})
    if name in CLASSIC:
        from metarec.models import classic
        cls = model_class(name)
        _check(name, cls, params)
        return classic.build(name, params, seed)
    cls = model_class(name)
    _check(name, cls, params)
    return cls(**params, seed=seed)


def _check(name: str, cls: type, params: Mapping[str, Any]) -> None:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "seed", "encoder"}
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(f"params.yaml model_params.{name}: unknown hyperparameter(s) {sorted(unknown)}; "
                          f"expected some of {sorted(allowed)}")


def fit(model: Any, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder) -> Any:
    """Fit with the encoder when the model takes one (neural models), without it otherwise."""
    if "encoder" in inspect.signature(model.fit).parameters:
        return model.fit(train, val, encoder=encoder)
    return model.fit(train, val)


def load(name: str, directory: str | Path, train: TaskSet | None = None) -> Any:
    return model_class(name).load(directory, train=train)


def history(model: Any) -> list[dict]:
    """Loss per epoch (a DVC plot); empty for the classic models, which have no epochs."""
    hist = getattr(model, "history_", None)
    if hist:
        return [dict(h) for h in hist]
    return []
