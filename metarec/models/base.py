"""The one interface every model answers, and the one base every model of this library inherits.

To audit your own model, implement `predict`: given tasks (user attributes, support ratings,
candidate items), return one array of predicted ratings per task, aligned with `task.candidates`.
Nothing else is required by `audit`; `fit`, `save` and `load` are how this library trains and
stores its own models.

`Estimator` is that library side, written once: scikit-learn's `BaseEstimator` supplies
`get_params`, `set_params` and `repr` from the constructor's signature, so the constructor only
stores its arguments (the hyperparameters) and `fit` checks them before anything is trained. Every
model is fitted the same way, `fit(train, val, encoder)`: the FeatureEncoder of the task split is
an input of training, not a hyperparameter, and models that do not use item features ignore it.
A class states its own facts: `name` (how params.yaml `models` calls it) and `description` (one
sentence saying what the model is, which the report's model card prints verbatim).
"""

from __future__ import annotations

import contextlib
import json
import numbers
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np
from sklearn.base import BaseEstimator

from metarec.errors import ConfigError
from metarec.features import FeatureEncoder
from metarec.tasks import Task, TaskSet

CONFIG = "config.json"
E = TypeVar("E", bound="Estimator")


@runtime_checkable
class Recommender(Protocol):
    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """Predicted ratings for each task's candidates (same order), on the rating scale."""
        ...


class Estimator(BaseEstimator):
    """Base of every model here: scikit-learn hyperparameters, checked fit, safe persistence.

    Subclasses set `name` and `description`, store their constructor arguments unchanged (no
    conversion, no checks: scikit-learn's contract, which makes `get_params` return exactly what
    was given and `set_params` + `fit` behave like a fresh constructor), and implement
    `_check_params` (raise ConfigError on a bad value), `_fit`, `predict`, `save` and `load`.
    `save` writes safetensors or parquet plus JSON, never pickle; `config.json` carries
    {"model": name, "params": config_params()} so `load` can rebuild the same hyperparameters.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def fit(self: E, train: TaskSet, val: TaskSet | None = None, encoder: FeatureEncoder | None = None) -> E:
        """Check the hyperparameters, then train on `train` (`val` only for early stopping or
        scoring, never trained on). `encoder`: the split's FeatureEncoder (models using item or
        user features need it)."""
        self._check_params()
        with self._fit_context():
            return self._fit(train, val, encoder)

    def _fit_context(self) -> contextlib.AbstractContextManager:
        """Run-time settings `_fit` runs under, which must not change a result (none by default; the
        network models flush float denormals, `training.flush_denormals`)."""
        return contextlib.nullcontext()

    def _check_params(self) -> None:
        """Raise ConfigError naming the first invalid hyperparameter (nothing to check by default)."""

    def _fit(self: E, train: TaskSet, val: TaskSet | None, encoder: FeatureEncoder | None) -> E:
        raise NotImplementedError

    def _require_encoder(self, encoder: FeatureEncoder | None) -> FeatureEncoder:
        """The encoder, for models built on item or user features (ConfigError when it is missing)."""
        if encoder is None:
            raise ConfigError(f"{self.name}: fit() needs the FeatureEncoder of the task split (encoder=...).")
        return encoder

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls: type[E], directory: str | Path, train: TaskSet | None = None) -> E:
        raise NotImplementedError

    # -------------------------------------------------------------- hyperparameters as JSON
    @classmethod
    def param_names(cls) -> list[str]:
        """The hyperparameters (the constructor's arguments), as scikit-learn reads them."""
        return list(cls._get_param_names())

    def config_params(self) -> dict[str, Any]:
        """`get_params()` as JSON values (tuples as lists): what config.json stores."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.get_params().items()}

    @classmethod
    def from_config_params(cls: type[E], params: Mapping[str, Any]) -> E:
        """The inverse of `config_params`: JSON lists come back as the tuples they were."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})

    @classmethod
    def read_config(cls, directory: str | Path) -> dict[str, Any]:
        """config.json of a saved model, refused when it was written by another model."""
        path = Path(directory) / CONFIG
        config = json.loads(path.read_text())
        if config.get("model") != cls.name:
            raise ConfigError(f"{path}: holds a {config.get('model')!r} model, not {cls.name!r}.")
        return config


def check_choice(model: str, param: str, value: Any, allowed: Sequence[Any]) -> None:
    """ConfigError unless value is one of allowed (the message names model, parameter and options)."""
    if value not in allowed:
        raise ConfigError(f"{model}: {param} must be one of {tuple(allowed)}, got {value!r}.")


def check_number(model: str, param: str, value: Any, low: float | None = None, high: float | None = None, *,
                 integer: bool = False, high_open: bool = False) -> None:
    """ConfigError unless value is a number (an integer when `integer`) in [low, high] (or [low, high)).

    Strings and booleans are refused rather than converted: YAML reads `1e-3` as a string, and a
    silent cast would hide that the file does not say what its author meant.
    """
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = "" if low is None and high is None else (
            f" >= {low}" if high is None else f" in [{low if low is not None else '-inf'}, {high}{')' if high_open else ']'}")
        raise ConfigError(f"{model}: {param} must be {'an integer' if integer else 'a number'}{bounds}, got {value!r}.")
