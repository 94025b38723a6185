"""A model behind an HTTP scoring service, audited through the same `predict(tasks)` as any other.

Why: the recommender a team ships often runs as a service, not as a class this package can import.
The audit only ever asks a model to score candidates given a user's attributes and support
ratings, which is a small JSON exchange (the protocol, version ``metarec-audit/1``):

request (POST, ``Content-Type: application/json``)::

    {"protocol": "metarec-audit/1",
     "tasks": [{"user_id": 17, "scenario": "user_cold",
                "user_attributes": {"gender": "F", "age": 31},
                "support": [{"item_id": 50, "rating": 5.0}, ...],
                "candidates": [12, 98, ...]}, ...]}

response (HTTP 200)::

    {"scores": [[4.1, 3.2, ...], ...]}    # one list per task, aligned with its candidates

Tasks go in batches of ``batch_size``; connection errors, timeouts and HTTP 429/502/503/504 are
retried with exponential backoff (urllib3's ``Retry``); anything else that is not a well-formed
answer stops the audit with one sentence naming the model, the batch, and the status or body.
Nothing is written by a failing stage, so there are no partial outputs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from metarec.errors import MetarecError
from metarec.tasks import Task

PROTOCOL = "metarec-audit/1"


class RemoteModelError(MetarecError):
    """The scoring service could not be reached or answered something other than scores."""


def _jsonable(value: Any) -> Any:
    """Plain JSON types for attribute values (numpy scalars, NaN as null)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def task_payload(task: Task) -> dict[str, Any]:
    """One task as the protocol's JSON object."""
    return {"user_id": _jsonable(task.user_id), "scenario": task.scenario,
            "user_attributes": {str(k): _jsonable(v) for k, v in task.user_attrs.items()},
            "support": [{"item_id": _jsonable(i), "rating": float(r)}
                        for i, r in zip(task.support_items.tolist(), task.support_ratings.tolist())],
            "candidates": [_jsonable(i) for i in task.candidates.tolist()]}


def parse_scores(body: Any, tasks: Sequence[Task], where: str) -> list[np.ndarray]:
    """Check a response body against the batch it answers; one sentence naming what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("scores"), list):
        raise RemoteModelError(f"{where}: the response has no 'scores' list")
    scores = body["scores"]
    if len(scores) != len(tasks):
        raise RemoteModelError(f"{where}: the response has {len(scores)} score lists for {len(tasks)} tasks")
    out = []
    for task, s in zip(tasks, scores):
        if not isinstance(s, list) or len(s) != len(task.candidates):
            n = len(s) if isinstance(s, list) else "no"
            raise RemoteModelError(f"{where}: user {task.user_id} got {n} scores for {len(task.candidates)} candidates")
        try:
            arr = np.asarray(s, dtype=np.float64)
        except (TypeError, ValueError):
            raise RemoteModelError(f"{where}: user {task.user_id}'s scores are not all numbers") from None
        if not np.all(np.isfinite(arr)):
            raise RemoteModelError(f"{where}: user {task.user_id}'s scores include NaN or infinity")
        out.append(arr)
    return out


class RemoteModel:
    """`predict(tasks)` by POSTing batches of tasks to ``endpoint`` (see the module docstring)."""

    description = "A recommender served over HTTP (metarec-audit/1 protocol), audited as pre-trained."
    predict_chunk = 256

    def __init__(self, endpoint: str, *, name: str = "remote", batch_size: int = 64, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5) -> None:
        self.endpoint = endpoint
        self.name = name
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._session = None

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "batch_size": self.batch_size, "timeout": self.timeout,
                "retries": self.retries, "backoff": self.backoff}

    def _http(self):
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            if not str(self.endpoint).startswith(("http://", "https://")):
                raise RemoteModelError(f"model {self.name}: endpoint {self.endpoint!r} is not an http(s) URL")
            retry = Retry(total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                          backoff_factor=self.backoff, status_forcelist=(429, 502, 503, 504),
                          allowed_methods=frozenset({"POST"}), raise_on_status=False)
            session = requests.Session()
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            self._session = session
        return self._session

    def predict(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        import requests

        out: list[np.ndarray] = []
        tasks = list(tasks)
        n_batches = max(1, math.ceil(len(tasks) / self.batch_size))
        for b, start in enumerate(range(0, len(tasks), self.batch_size)):
            batch = tasks[start: start + self.batch_size]
            where = (f"model {self.name} at {self.endpoint}, task batch {b + 1} of {n_batches} "
                     f"(tasks {start + 1}-{start + len(batch)})")
            try:
                resp = self._http().post(self.endpoint, json={"protocol": PROTOCOL,
                                                              "tasks": [task_payload(t) for t in batch]},
                                         timeout=self.timeout)
            except requests.RequestException as exc:
                reason = type(exc).__name__
                raise RemoteModelError(f"{where}: no answer after {self.retries} retries ({reason})") from None
            if resp.status_code != 200:
                raise RemoteModelError(f"{where}: HTTP {resp.status_code}: {resp.text[:200]!r}")
            try:
                body = resp.json()
            except (ValueError, RecursionError):
                raise RemoteModelError(f"{where}: the response is not JSON: {resp.text[:200]!r}") from None
            out.extend(parse_scores(body, batch, where))
        return out
