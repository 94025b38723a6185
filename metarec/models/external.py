"""Models from outside this package: a team's own class, or a model behind an HTTP service.

Why an adapter: the pipeline drives every model the same way (fit with the task splits, save,
load in later stages, predict), but a team's class owes us only `predict(tasks)`; `fit(train,
val)`, `save(dir)` and `load(dir)` are optional. `ExternalModel` gives such a model the pipeline's
interface without asking more of it:

- no `fit`: the model is audited as pre-trained (every seed evaluates the same model, so the
  seed spread is not applicable and the report says so);
- `fit` but no `save`/`load`: fitted on the training split (no validation split, so the fit
  a later stage repeats is the same fit), and refitted when a later stage needs it: it must be
  deterministic given `seed` and the data;
- `save` and `load`: used as they are, under `<model dir>/model/`.

Ids: a fitted model sees the internal integer codes throughout (it was fitted on them); a model
that was not fitted here (a pre-trained class, a service) knows the data owner's own ids, so its
tasks carry those (`original_ids`, set by the train stage for text ids and saved with the model).

Every prediction is checked before anything is written: one array per task, of the task's
length, finite, on the rating scale. A definition names a class (`class: "pkg.module:Class"`,
constructor arguments under `params`; `seed` is passed when the constructor takes it) or an
endpoint (`endpoint: URL`, options of metarec.models.remote.RemoteModel).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from metarec.errors import ConfigError
from metarec.tasks import Task, TaskSet

__all__ = ["ExternalModel", "import_target", "check_predictions"]

_OPTIONS = ("batch_size", "timeout", "retries", "backoff")


def import_target(name: str, target: str) -> type:
    """The class a "package.module:Class" string names; ConfigError naming the model otherwise."""
    module, sep, attr = str(target).partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"model {name!r}: class {target!r} is not of the form 'package.module:Class'")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"model {name!r}: cannot import {module!r} ({exc}); is its package installed?") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"model {name!r}: {module!r} has no {attr!r}")
    if not isinstance(obj, type):
        raise ConfigError(f"model {name!r}: {target!r} is not a class")
    if not callable(getattr(obj, "predict", None)):
        raise ConfigError(f"model {name!r}: {target} has no predict(tasks) method")
    return obj


def check_predictions(name: str, tasks: Sequence[Task], preds: Any, scale: tuple[float, float] | None) -> list[np.ndarray]:
    """The predictions as float arrays, or ConfigError naming the model and the first problem."""
    if not isinstance(preds, (list, tuple)) or len(preds) != len(tasks):
        n = len(preds) if isinstance(preds, (list, tuple)) else type(preds).__name__
        raise ConfigError(f"model {name!r}: predict returned {n} results for {len(tasks)} tasks; expected a list "
                          f"with one array per task")
    out = []
    for t, p in zip(tasks, preds):
        arr = np.asarray(p, dtype=np.float64) if np.ndim(p) == 1 else None
        if arr is None or arr.shape != (len(t.candidates),):
            raise ConfigError(f"model {name!r}: predict returned shape {np.shape(p)} for user {t.user_id}; "
                              f"expected ({len(t.candidates)},), one score per candidate")
        if not np.all(np.isfinite(arr)):
            raise ConfigError(f"model {name!r}: predict returned NaN or infinite ratings for user {t.user_id}")
        if scale is not None and (arr.min(initial=scale[0]) < scale[0] or arr.max(initial=scale[1]) > scale[1]):
            raise ConfigError(f"model {name!r}: predict returned ratings outside the rating scale "
                              f"[{scale[0]:g}, {scale[1]:g}] for user {t.user_id} (min {arr.min():.4g}, "
                              f"max {arr.max():.4g})")
        out.append(arr)
    return out


class ExternalModel:
    """The pipeline's model interface around a definition from params.yaml or an entry point."""

    external = True
    # One predict call gets every task of a split (metarec.predict.predict_in_chunks): a team's
    # model may, like the classic ones here, depend on which tasks are asked together; a service
    # is batched by its own batch_size.
    predict_chunk = None

    def __init__(self, name: str, definition: Mapping[str, Any], seed: int = 0,
                 rating_scale: tuple[float, float] | None = None) -> None:
        self.name = name
        self.definition = dict(definition)
        self.seed = int(seed)
        self.rating_scale = tuple(rating_scale) if rating_scale is not None else None
        self.original_ids: dict[str, Any] | None = None   # {"user_id": IdMap, "item_id": IdMap}
        self.inner = self._build()

    # ------------------------------------------------------------------------------ construction
    def _build(self) -> Any:
        d = self.definition
        if ("class" in d) == ("endpoint" in d):
            raise ConfigError(f"model {self.name!r}: a custom model names exactly one of 'class' or 'endpoint'")
        if "endpoint" in d:
            from metarec.models.remote import RemoteModel

            unknown = sorted(set(d) - {"endpoint", "description", *_OPTIONS})
            if unknown:
                raise ConfigError(f"model {self.name!r}: unknown endpoint option(s) {unknown}; expected some of "
                                  f"{list(_OPTIONS)}")
            return RemoteModel(str(d["endpoint"]), name=self.name, **{k: d[k] for k in _OPTIONS if k in d})
        unknown = sorted(set(d) - {"class", "params", "description"})
        if unknown:
            raise ConfigError(f"model {self.name!r}: unknown key(s) {unknown}; expected class and params")
        cls = import_target(self.name, d["class"])
        params = dict(d.get("params") or {})
        try:
            accepts_seed = "seed" in inspect.signature(cls).parameters
        except (TypeError, ValueError):
            accepts_seed = False
        if accepts_seed:
            params.setdefault("seed", self.seed)
        try:
            return cls(**params)
        except TypeError as exc:
            raise ConfigError(f"model {self.name!r}: {d['class']}({', '.join(params)}) failed: {exc}") from None

    @property
    def description(self) -> str:
        d = self.definition
        if d.get("description"):
            return str(d["description"])
        if "endpoint" in d:
            return f"A model served over HTTP at {d['endpoint']} (metarec-audit/1 protocol), audited as pre-trained."
        own = getattr(type(self.inner), "description", None)
        if isinstance(own, str) and own:
            return own
        doc = (type(self.inner).__doc__ or "").strip().splitlines()
        return f"{d['class']}: {doc[0]}" if doc else f"A team model, {d['class']}."

    @property
    def pretrained(self) -> bool:
        return not callable(getattr(self.inner, "fit", None))

    @property
    def persists(self) -> bool:
        cls = type(self.inner)
        return callable(getattr(self.inner, "save", None)) and callable(getattr(cls, "load", None))

    # ---------------------------------------------------------------------------------- pipeline
    def fit(self, train: TaskSet, val: TaskSet | None = None, encoder: Any = None) -> "ExternalModel":
        if not self.pretrained:
            result = self.inner.fit(train, val if self.persists else None)
            if result is not None and result is not self.inner and callable(getattr(result, "predict", None)):
                self.inner = result
        return self

    def _as_owner_ids(self, task: Task) -> Task:
        users, items = self.original_ids["user_id"], self.original_ids["item_id"]
        return task.replace(user_id=users.label(int(task.user_id)),
                            support_items=items.original(np.asarray(task.support_items)).to_numpy(),
                            candidates=items.original(np.asarray(task.candidates)).to_numpy())

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        tasks = list(tasks)
        asked = [self._as_owner_ids(t) for t in tasks] if self.original_ids and self.pretrained else tasks
        return check_predictions(self.name, tasks, self.inner.predict(asked), self.rating_scale)

    def save(self, directory: str | Path) -> None:
        from metarec.io import atomic_write_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.persists:
            self.inner.save(d / "model")
        if self.original_ids:
            from metarec.io import atomic_write_parquet

            for key, ids in self.original_ids.items():
                atomic_write_parquet(d / f"{key}s.parquet", ids.to_frame())
        atomic_write_json(d / "external.json", {
            "model": self.name, "definition": self.definition, "seed": self.seed,
            "rating_scale": list(self.rating_scale) if self.rating_scale else None,
            "pretrained": self.pretrained, "persisted": self.persists})

    @classmethod
    def load(cls, directory: str | Path, train: TaskSet | None = None) -> "ExternalModel":
        d = Path(directory)
        try:
            doc = json.loads((d / "external.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(f"{d}: no readable external.json; re-run the model's train stage") from None
        model = cls(doc["model"], doc["definition"], doc["seed"], doc.get("rating_scale"))
        if (d / "user_ids.parquet").is_file():
            import pandas as pd

            from metarec.data.ids import IdMap

            model.original_ids = {key: IdMap.from_frame(pd.read_parquet(d / f"{key}s.parquet"))
                                  for key in ("user_id", "item_id")}
        if doc.get("persisted"):
            model.inner = type(model.inner).load(d / "model")
        elif not model.pretrained:
            if train is None:
                raise ConfigError(f"model {doc['model']!r} has no save/load: loading it refits it, which needs "
                                  f"the training split")
            model.fit(train, None)
        return model

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"definition": self.definition, "seed": self.seed}
