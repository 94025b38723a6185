"""Auditing a model behind an HTTP service: the reference server on 127.0.0.1, and every way a
service can misbehave, each with its one-sentence error."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
import pytest

from metarec.models.remote import PROTOCOL, RemoteModel, RemoteModelError, task_payload
from metarec.serving import make_server, parse_request, BadRequest
from metarec.tasks import Task
from tests.helpers_tiny import make_tiny


class Serving:
    """Run a server in a thread for the duration of a with-block."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}/score"

    def __enter__(self) -> "Serving":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tiny_model():
    from metarec.models.registry import build

    tiny = make_tiny(seed=3)
    model = build("bias", {"n_epochs": 5}, seed=0).fit(tiny.train)
    return model, tiny.val.tasks()


def test_reference_server_gives_exactly_the_models_predictions(tiny_model) -> None:
    # one batch: the classic models fold every support set they are asked about into one fit, so
    # their answers depend on which tasks come together (their predict_chunk is None)
    model, tasks = tiny_model
    with Serving(make_server(model, port=0)) as s:
        remote = RemoteModel(s.url, name="prod", batch_size=len(tasks))
        got = remote.predict(tasks)
    want = model.predict(tasks)
    assert len(got) == len(want) == len(tasks)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w, dtype=np.float64))


def test_payload_round_trips_through_the_servers_parser(tiny_model) -> None:
    _, tasks = tiny_model
    back = parse_request(json.loads(json.dumps({"protocol": PROTOCOL, "tasks": [task_payload(t) for t in tasks]})))
    for a, b in zip(tasks, back):
        assert a.user_id == b.user_id and a.scenario == b.scenario
        np.testing.assert_array_equal(a.candidates, b.candidates)
        np.testing.assert_array_equal(a.support_items, b.support_items)
        np.testing.assert_array_equal(a.support_ratings, b.support_ratings)
        assert {k: (v.item() if isinstance(v, np.generic) else v) for k, v in a.user_attrs.items()} == b.user_attrs


def _fake(reply: Callable[[dict, int], tuple[int, bytes]]) -> ThreadingHTTPServer:
    """A service whose answer to the n-th request is reply(body, n)."""
    calls = {"n": 0}

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls["n"] += 1
            status, data = reply(body, calls["n"])
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.calls = calls
    return server


def _task(uid: int, n: int = 3) -> Task:
    return Task(user_id=uid, user_attrs={"plan": "pro"}, support_items=np.array([1, 2]),
                support_ratings=np.array([4.0, 5.0], dtype=np.float32), candidates=np.arange(10, 10 + n))


def _ok(body: dict) -> bytes:
    return json.dumps({"scores": [[3.0] * len(t["candidates"]) for t in body["tasks"]]}).encode()


TASKS = [_task(u) for u in range(5)]


@pytest.mark.parametrize("reply, message", [
    (lambda b, n: (500, b"boom"), "HTTP 500: 'boom'"),
    (lambda b, n: (200, b"<html>"), "the response is not JSON: '<html>'"),
    (lambda b, n: (200, b'{"scores": [[1.0]]}'), "the response has 1 score lists for 2 tasks"),
    (lambda b, n: (200, json.dumps({"scores": [[1.0, 2.0], [1.0, 2.0, 3.0]]}).encode()),
     "user 0 got 2 scores for 3 candidates"),
    (lambda b, n: (200, json.dumps({"scores": [[1.0, float("nan"), 2.0]] * 2}).encode()),
     "user 0's scores include NaN or infinity"),
    (lambda b, n: (200, json.dumps({"scores": [[1.0, "x", 2.0]] * 2}).encode()), "user 0's scores are not all numbers"),
    (lambda b, n: (200, b'{"error": 1}'), "the response has no 'scores' list"),
])
def test_misbehaving_service_stops_with_the_batch_and_reason(reply, message) -> None:
    with Serving(_fake(reply)) as s:
        with pytest.raises(RemoteModelError) as err:
            RemoteModel(s.url, name="prod", batch_size=2, retries=0).predict(TASKS)
    assert str(err.value) == f"model prod at {s.url}, task batch 1 of 3 (tasks 1-2): {message}"


def test_transient_503_is_retried_with_backoff() -> None:
    with Serving(_fake(lambda b, n: (503, b"busy") if n <= 2 else (200, _ok(b)))) as s:
        got = RemoteModel(s.url, batch_size=10, retries=3, backoff=0.01).predict(TASKS)
        assert s.server.calls["n"] == 3
    assert [g.tolist() for g in got] == [[3.0] * 3] * 5


def test_timeout_is_retried_then_named() -> None:
    def slow(b, n):
        time.sleep(0.5)
        return 200, _ok(b)

    with Serving(_fake(slow)) as s:
        with pytest.raises(RemoteModelError, match=r"task batch 1 of 1 \(tasks 1-5\): no answer after 1 retries \(\w+\)"):
            RemoteModel(s.url, name="prod", timeout=0.1, retries=1, backoff=0.0).predict(TASKS)


def test_unreachable_service_is_named() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    server.server_close()
    with pytest.raises(RemoteModelError, match=r"no answer after 0 retries \(ConnectionError\)"):
        RemoteModel(url, name="prod", retries=0).predict(TASKS)


def test_non_http_endpoint_is_refused() -> None:
    with pytest.raises(RemoteModelError, match="model prod: endpoint 'file:///etc/passwd' is not an http\\(s\\) URL"):
        RemoteModel("file:///etc/passwd", name="prod").predict(TASKS)


@pytest.mark.parametrize("body, message", [
    ({"tasks": []}, "the request must be a JSON object with protocol 'metarec-audit/1'"),
    ({"protocol": PROTOCOL}, "the request must have a 'tasks' list"),
    ({"protocol": PROTOCOL, "tasks": [{"candidates": [1, "a"]}]}, "task 0: candidates must be all integers or all strings"),
    ({"protocol": PROTOCOL, "tasks": [{"candidates": [1], "support": [{"item_id": 1}]}]},
     "task 0: support must be a list of {item_id, rating} objects"),
])
def test_server_refuses_requests_off_protocol(body, message) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(body)
    assert str(err.value) == message
