"""A reference scoring service for the ``metarec-audit/1`` protocol (see metarec.models.remote).

Why it exists: it proves the protocol end to end with a real model, and it is what a team can
compare its own service with. It serves any object with `predict(tasks)` on a loopback address by
default; it is a reference, not a production server (one process, no authentication).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from metarec.models.base import Recommender
from metarec.models.remote import PROTOCOL
from metarec.tasks import Task

MAX_BODY = 64 * 1024 * 1024


class BadRequest(ValueError):
    """The request does not follow the protocol; answered with HTTP 400 and the reason."""


def _ids(values: Any, what: str) -> np.ndarray:
    if not isinstance(values, list):
        raise BadRequest(f"{what} must be a list")
    kinds = {type(v) for v in values}
    if kinds <= {int}:
        return np.asarray(values, dtype=np.int64)
    if kinds <= {str}:
        return np.asarray(values, dtype=object)
    raise BadRequest(f"{what} must be all integers or all strings")


def parse_request(body: Any) -> list[Task]:
    """Tasks from a request body; BadRequest names the first thing that does not fit."""
    if not isinstance(body, dict) or body.get("protocol") != PROTOCOL:
        raise BadRequest(f"the request must be a JSON object with protocol {PROTOCOL!r}")
    raw = body.get("tasks")
    if not isinstance(raw, list):
        raise BadRequest("the request must have a 'tasks' list")
    tasks = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise BadRequest(f"task {i} is not an object")
        support = t.get("support", [])
        attrs = t.get("user_attributes", {})
        if not isinstance(support, list) or not all(isinstance(s, dict) and "item_id" in s and "rating" in s
                                                    for s in support):
            raise BadRequest(f"task {i}: support must be a list of {{item_id, rating}} objects")
        if not isinstance(attrs, dict):
            raise BadRequest(f"task {i}: user_attributes must be an object")
        try:
            ratings = np.asarray([float(s["rating"]) for s in support], dtype=np.float32)
        except (TypeError, ValueError):
            raise BadRequest(f"task {i}: a support rating is not a number") from None
        tasks.append(Task(user_id=t.get("user_id"), user_attrs=attrs,
                          support_items=_ids([s["item_id"] for s in support], f"task {i}: support item ids"),
                          support_ratings=ratings,
                          candidates=_ids(t.get("candidates"), f"task {i}: candidates"),
                          scenario=str(t.get("scenario", ""))))
    return tasks


def to_codes(tasks: list[Task], id_maps: dict[str, Any]) -> list[Task]:
    """Tasks in the data owner's text ids -> the internal codes the served model was fitted on."""
    users = {v: i for i, v in enumerate(id_maps["user_id"].originals)}
    items = {v: i for i, v in enumerate(id_maps["item_id"].originals)}

    def code(table: dict, value: Any, what: str, i: int) -> int:
        if str(value) not in table:
            raise BadRequest(f"task {i}: {what} {value!r} is not in the audited data")
        return table[str(value)]

    out = []
    for i, t in enumerate(tasks):
        out.append(t.replace(
            user_id=users.get(str(t.user_id), -1),
            support_items=np.array([code(items, v, "item id", i) for v in t.support_items.tolist()], dtype=np.int64),
            candidates=np.array([code(items, v, "item id", i) for v in t.candidates.tolist()], dtype=np.int64)))
    return out


def make_handler(model: Recommender, id_maps: dict[str, Any] | None = None) -> type[BaseHTTPRequestHandler]:
    """The request handler; with text id maps, requests in the owner's ids are translated to codes."""
    lock = threading.Lock()   # models are not promised to be thread-safe
    translate = bool(id_maps) and any(m.kind == "string" for m in id_maps.values())

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, doc: dict) -> None:
            data = json.dumps(doc).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    raise BadRequest(f"the request body is larger than {MAX_BODY} bytes")
                body = json.loads(self.rfile.read(n) or b"null")
                tasks = parse_request(body)
                if translate:
                    tasks = to_codes(tasks, id_maps)
            except (BadRequest, ValueError, RecursionError) as exc:
                self._answer(400, {"error": str(exc) if isinstance(exc, BadRequest) else "the body is not JSON"})
                return
            with lock:
                scores = model.predict(tasks)
            self._answer(200, {"scores": [np.asarray(s, dtype=np.float64).tolist() for s in scores]})

        def log_message(self, *args: Any) -> None:   # quiet: the audit's logs are its own
            pass

    return Handler


def make_server(model: Recommender, host: str = "127.0.0.1", port: int = 8765,
                id_maps: dict[str, Any] | None = None) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (port 0 picks a free port: see server.server_address)."""
    return ThreadingHTTPServer((host, port), make_handler(model, id_maps))
