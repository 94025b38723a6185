"""The one interface every model answers, and through which the audit sees it.

To audit your own model, implement `predict`: given tasks (user attributes, support ratings,
candidate items), return one array of predicted ratings per task, aligned with `task.candidates`.
Nothing else is required by `audit`; `fit`, `save` and `load` are how this library trains and
stores its own models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from metarec.tasks import Task, TaskSet


@runtime_checkable
class Recommender(Protocol):
    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """Predicted ratings for each task's candidates (same order), on the rating scale."""
        ...


class TrainableRecommender(Recommender, Protocol):
    """What this library's models add: scikit-learn style fit, plus safe persistence.

    Constructor arguments are the hyperparameters (including `seed`); `fit` holds no hidden
    state beyond what it learns. `save` writes safetensors weights (never pickle), a JSON config
    and a JSON training history to a directory; `load` reads them back.
    """

    def fit(self, train: TaskSet, val: TaskSet | None = None) -> "TrainableRecommender": ...

    def save(self, directory: str | Path) -> None: ...

    @classmethod
    def load(cls, directory: str | Path, train: TaskSet | None = None) -> "TrainableRecommender": ...
