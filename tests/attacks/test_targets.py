"""``HTTPTarget`` against a scripted in-process ASGI endpoint: batching, JSON pointers, answer
formats, key rotation, 429/Retry-After, degradation and blocking events, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attacks import targets
from attacks.targets import (
    HTTPTarget,
    OutputUnavailable,
    TargetBlocked,
    TargetError,
    TargetThrottled,
)

PROBABILITIES = [0.25, 0.75]


class ScriptedAPI:
    """A raw ASGI endpoint answering each request with the next scripted ``(status, body(rows),
    headers)``; it records every request's JSON body and headers."""

    def __init__(self, *script):
        self.script = list(script)
        self.requests: list[tuple[dict, dict]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        self.requests.append((request, {k.decode(): v.decode() for k, v in scope["headers"]}))
        status, make, headers = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        rows = request["input"]["rows"] if "input" in request else request["features"]
        payload = make(rows).encode() if callable(make) else make.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": payload})


def answer(value_of_row):
    return 200, lambda rows: json.dumps({"probabilities": [value_of_row(row) for row in rows]}), []


PROBS = answer(lambda row: PROBABILITIES)
LABELS = answer(lambda row: 1)


def test_batches_json_pointers_and_key_rotation():
    api = ScriptedAPI((200, lambda rows: json.dumps({"out": {"p/q": [PROBABILITIES] * len(rows)}}), []))
    target = HTTPTarget("/predict", 2, client=api, batch_size=4, features_path="/input/rows",
                        probabilities_path="/out/p~1q", api_keys=["a", "b"])
    X = np.arange(20, dtype=float).reshape(10, 2)
    np.testing.assert_allclose(target.predict_proba(X), [PROBABILITIES] * 10)
    assert target.queries == 10 and target.returns_probabilities
    assert [len(request["input"]["rows"]) for request, _ in api.requests] == [4, 4, 2]
    np.testing.assert_allclose(np.vstack([request["input"]["rows"] for request, _ in api.requests]), X)
    assert [headers["x-api-key"] for _, headers in api.requests] == ["a", "b", "a"]


def test_several_keys_share_every_call_evenly():
    api = ScriptedAPI(PROBS)
    target = HTTPTarget("/predict", 2, client=api, batch_size=256, api_keys=["a", "b", "c"])
    target.predict_proba(np.zeros((8, 2)))
    assert [len(request["features"]) for request, _ in api.requests] == [3, 3, 2]
    assert [headers["x-api-key"] for _, headers in api.requests] == ["a", "b", "c"]


@pytest.mark.parametrize("entry, expected", [
    ({"cat": 0.25, "dog": 0.75}, [[0.25, 0.75]]),
    ("dog", [1]),
    (1, [1]),
])
def test_answer_formats(entry, expected):
    api = ScriptedAPI(answer(lambda row: entry))
    target = HTTPTarget("/predict", 2, client=api, class_labels=["cat", "dog"], n_features=3)
    np.testing.assert_allclose(target.answer(np.zeros((1, 3))), expected)
    assert target.returns_probabilities == isinstance(entry, dict)
    assert target.predict(np.zeros((1, 3)))[0] == 1


def test_label_only_endpoint_is_discovered_by_a_probe_and_refuses_probabilities():
    api = ScriptedAPI(LABELS)
    target = HTTPTarget("/predict", 2, client=api, n_features=5)
    assert not target.returns_probabilities
    assert target.queries == 1 and len(api.requests[0][0]["features"][0]) == 5
    with pytest.raises(OutputUnavailable, match="labels only"):
        target.predict_proba(np.zeros((2, 5)))
    np.testing.assert_array_equal(target.predict(np.zeros((2, 5))), [1, 1])


def test_throttling_is_waited_out_and_recorded(monkeypatch):
    slept = []
    monkeypatch.setattr(targets.time, "sleep", slept.append)
    throttled = (429, '{"detail": "slow down"}', [(b"retry-after", b"2")])
    api = ScriptedAPI(PROBS, throttled, throttled, PROBS)
    target = HTTPTarget("/predict", 2, client=api, batch_size=3, max_wait=10)
    assert target.predict_proba(np.zeros((6, 2))).shape == (6, 2)
    assert slept == [2.0, 2.0] and target.queries == 6
    assert target.events == {"throttled_at": 3, "degraded_at": None, "blocked_at": None}


def test_endless_throttling_gives_up_after_max_wait(monkeypatch):
    monkeypatch.setattr(targets.time, "sleep", lambda seconds: None)
    api = ScriptedAPI((429, "{}", [(b"retry-after", b"5")]))
    with pytest.raises(TargetThrottled, match="429"):
        HTTPTarget("/predict", 2, client=api, max_wait=12).predict_proba(np.zeros((1, 2)))


def test_degradation_then_block_are_recorded_with_the_answered_counts():
    api = ScriptedAPI(PROBS, PROBS, LABELS, (403, '{"detail": "blocked"}', []))
    target = HTTPTarget("/predict", 2, client=api, batch_size=2)
    assert target.predict_proba(np.zeros((4, 2))).shape == (4, 2)
    assert target.predict(np.zeros((2, 2))).tolist() == [1, 1]
    with pytest.raises(TargetBlocked) as blocked:
        target.answer(np.zeros((4, 2)))
    assert blocked.value.queries == 6 == target.queries
    assert blocked.value.events == {"throttled_at": None, "degraded_at": 4, "blocked_at": 6}
    assert blocked.value.status == 403 and "blocked" in blocked.value.body


@pytest.mark.parametrize("script, message", [
    ((500, "Internal Server Error", []), "status 500"),
    ((200, "not json", []), "no predictions"),
    ((200, '{"other": []}', []), "no predictions"),
    (answer(lambda row: [0.5, 0.5, 0.0]), "rows of 2"),
    (answer(lambda row: "ferret"), "unparseable"),
    (answer(lambda row: 7), "outside"),
    ((200, lambda rows: json.dumps({"probabilities": [[0.5, 0.5]]}), []), "list of 2"),
])
def test_bad_answers_raise_clear_errors(script, message):
    target = HTTPTarget("/predict", 2, client=ScriptedAPI(script), class_labels=["cat", "dog"])
    with pytest.raises(TargetError, match=message):
        target.answer(np.zeros((2, 2)))


def test_an_app_exception_is_a_500_not_a_crash():
    async def broken(scope, receive, send):
        raise RuntimeError("model fell over")

    with pytest.raises(TargetError, match="500"):
        HTTPTarget("/predict", 2, client=broken).answer(np.zeros((1, 2)))


def test_budget_counts_rows():
    target = HTTPTarget("/predict", 2, client=ScriptedAPI(PROBS), budget=3)
    target.answer(np.zeros((3, 2)))
    with pytest.raises(targets.QueryBudgetExceeded):
        target.answer(np.zeros((1, 2)))


def test_http_target_paces_itself_by_the_guards_ratelimit_headers():
    """Single rows of named fields against a guarded endpoint allowing 3 queries a second: the
    target waits for the window's reset instead of being refused."""
    import time

    from fastapi import FastAPI

    from guard import GuardMiddleware, Policy

    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        return {"probabilities": {"no": 1 - body["x"], "yes": body["x"]}}

    route = {"probabilities": "/probabilities", "features": ["/x"], "rate_limits": ["3 per 1 second"]}
    app.add_middleware(GuardMiddleware, policy=Policy(secret="pacing test secret", routes={"/predict": route}))
    seen = []
    with HTTPTarget("http://t/predict", 2, client=app, features_path="", fields=["x"], single_rows=True,
                    class_labels=["no", "yes"], progress=seen.append, max_wait=5) as target:
        started = time.monotonic()
        answers = target.predict_proba(np.linspace(0.1, 0.9, 7)[:, None])
        elapsed = time.monotonic() - started
    assert np.allclose(answers[:, 1], np.linspace(0.1, 0.9, 7))
    assert target.events["throttled_at"] is None and seen == list(range(1, 8))
    assert elapsed >= 1.0  # seven queries at three a second span at least two windows
