"""The bench's prediction server: orjson bodies with the JSON semantics of the plain FastAPI route."""
from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from attacks.targets import HTTPTarget
from guard.serving import prediction_app

D, K = 5, 3
WEIGHTS = np.random.default_rng(0).normal(size=(D, K))


def softmax(X: np.ndarray) -> np.ndarray:
    logits = X @ WEIGHTS
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.fixture
def client():
    with TestClient(prediction_app(softmax, D)) as client:
        yield client


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_answers_parse_to_the_values_the_standard_library_would_send(dtype):
    X = np.random.default_rng(1).random((7, D))
    with TestClient(prediction_app(lambda rows: softmax(rows).astype(dtype), D)) as client:
        batch = client.post("/predict", content=json.dumps({"features": X.tolist()}))
        single = client.post("/predict", json={"features": X[0].tolist()})
    expected = softmax(X).astype(dtype)
    assert batch.headers["content-type"] == "application/json"
    assert json.loads(batch.content) == {"probabilities": expected.tolist()}
    assert json.loads(single.content) == {"probabilities": expected[0].tolist()}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"inputs": [1, 2, 3, 4, 5]}', b'{"features": 3}',
                                  b'{"features": [1, 2]}', b'{"features": [[1, 2, 3, 4, 5], [1]]}',
                                  b'{"features": [1, "x", 3, 4, 5]}', b'{"features": [1, null, 3, 4, 5]}',
                                  b'{"features": [[[1, 2, 3, 4, 5]]]}', b'{"features": []}'])
def test_what_is_not_a_request_is_answered_422_with_a_detail(client, body):
    answer = client.post("/predict", content=body)
    assert answer.status_code == 422 and answer.json()["detail"]


def test_http_target_round_trip_is_the_model(client):
    X = np.random.default_rng(2).random((300, D))
    with HTTPTarget("http://local/predict", K, client=client.app, batch_size=128) as target:
        np.testing.assert_allclose(target.predict_proba(X), softmax(X), rtol=1e-12)
    with HTTPTarget("http://local/predict", K, client=client.app, single_rows=True) as target:
        np.testing.assert_allclose(target.predict_proba(X[:3]), softmax(X[:3]), rtol=1e-12)
