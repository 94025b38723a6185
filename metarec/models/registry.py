"""Model names (as in params.yaml `models`) to model classes: resolve, build, load, history.

The registry maps each name to a class, written as "module:Class" (the form of an entry point, and
of the `class:` key issue 16 adds to params.yaml) and imported on first use, so that a pipeline
that runs only the classic models never imports torch. Every class is an `Estimator`, whose
`name` must be the name it is registered under: the class, not this module, states what a model
is called, what it is (`description`) and which hyperparameters it takes.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from metarec.errors import ConfigError
from metarec.models.base import Estimator
from metarec.tasks import TaskSet

BUILTIN: dict[str, str] = {
    "melu": "metarec.models.melu:MeLU",
    "ensemble": "metarec.models.ensemble:SupportSetEnsemble",
    "finetune": "metarec.models.transfer:FineTune",
    "global": "metarec.models.transfer:GlobalModel",
    "mean": "metarec.models.classic:GlobalMean",
    "bias": "metarec.models.classic:BiasBaseline",
    "pop": "metarec.models.classic:Popularity",
    "itemknn": "metarec.models.classic:ItemKNN",
    "svd": "metarec.models.classic:SVDRecommender",
}
NAMES = tuple(BUILTIN)
# Models that run without torch (scikit-surprise and pandas): seeded without torch.
CLASSIC = tuple(name for name, target in BUILTIN.items() if target.startswith("metarec.models.classic:"))
ENTRY_POINT_GROUP = "metarec_audit.models"
# A model_params entry with one of these keys defines a model from outside the package (driven by
# metarec.models.external) instead of holding a registered model's hyperparameters. Why there and
# not as mappings inside `models`: DVC's matrix names each train stage and its outputs after the
# entries of `models`, and `model_params.<name>` is the params key each train cell depends on.
EXTERNAL_KEYS = ("class", "endpoint")


def entry_points() -> dict[str, str]:
    """name -> "module:Class" registered by installed packages under `metarec_audit.models`."""
    from importlib.metadata import entry_points as eps

    return {ep.name: ep.value for ep in eps(group=ENTRY_POINT_GROUP)}


def external_definition(name: str, params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The definition of a model from outside the package, or None for a built-in model.

    `params` is the model's params.yaml `model_params.<name>`: either a definition ({class, params}
    or {endpoint, ...}) or, for a built-in or entry-point model, its hyperparameters.
    """
    params = dict(params or {})
    if any(k in params for k in EXTERNAL_KEYS):
        if name in BUILTIN:
            raise ConfigError(f"params.yaml model_params.{name}: {name!r} is a built-in model; a custom model "
                              f"defined with class or endpoint needs a name of its own")
        return params
    if name not in BUILTIN:
        target = entry_points().get(name)
        if target is not None:
            return {"class": target, "params": params}
    return None


def known(name: str, params: Mapping[str, Any] | None) -> bool:
    return name in BUILTIN or external_definition(name, params) is not None


def describe(name: str, params: Mapping[str, Any] | None = None) -> str:
    """The one-sentence description a model states about itself."""
    definition = external_definition(name, params)
    if definition is not None:
        from metarec.models.external import ExternalModel

        return ExternalModel(name, definition, 0).description
    return model_class(name).description


@lru_cache(maxsize=None)
def model_class(name: str) -> type[Estimator]:
    """The class registered under `name`; ConfigError for a name that is not registered."""
    target = BUILTIN.get(name)
    if target is None:
        raise ConfigError(f"unknown model {name!r}; expected one of {', '.join(NAMES)}, a name registered "
                          f"under the {ENTRY_POINT_GROUP} entry points, or model_params.{name} with class or endpoint")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Estimator)) or cls.name != name:
        raise ConfigError(f"model {name!r}: {target} is not an Estimator whose name is {name!r}")
    return cls


def build(name: str, params: Mapping[str, Any] | None, seed: int) -> Estimator:
    """A fresh, unfitted model with the hyperparameters of params.yaml `model_params.<name>` and a
    seed from `seeds` (which is why `seed` itself is refused there). Values are checked by `fit`."""
    definition = external_definition(name, params)
    if definition is not None:
        from metarec.models.external import ExternalModel

        return ExternalModel(name, definition, seed)
    cls = model_class(name)
    params = dict(params or {})
    allowed = set(cls.param_names()) - {"seed"}
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(f"params.yaml model_params.{name}: unknown hyperparameter(s) {sorted(unknown)}; "
                          f"expected some of {sorted(allowed)} (seeds come from `seeds`)")
    return cls(**params, seed=seed)


def load(name: str, directory: str | Path, train: TaskSet | None = None) -> Estimator:
    """The fitted model saved in `directory` by the model registered as `name`."""
    if (Path(directory) / "external.json").is_file():
        from metarec.models.external import ExternalModel

        return ExternalModel.load(directory, train=train)
    return model_class(name).load(directory, train=train)


def history(model: Any) -> list[dict]:
    """Loss per epoch (a DVC plot); empty for the classic models, which have no epochs."""
    hist = getattr(model, "history_", None)
    if hist:
        return [dict(h) for h in hist]
    return []
