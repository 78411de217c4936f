"""Two uvicorn worker processes sharing Redis enforce ONE rate limit and one sanction standing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from conftest import free_port, wait_until_serving

APP = '''
import os
import numpy as np
from guard.serving import prediction_app
from guard import GuardMiddleware, Policy

W = np.random.default_rng(0).normal(size=(16, 3))

def softmax(X):
    z = X @ W
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

app = prediction_app(softmax, 16)
app.add_middleware(GuardMiddleware, policy=Policy(
    secret="two workers share this secret", store=os.environ["GUARD_STORE"],
    detectors={"similarity": {"threshold": 5, "window": 4, "quantization": 0.1,
                              "table": os.environ["GUARD_TABLE"]}},
    identity={"header": "X-API-Key"},
    routes={"/predict": {"probabilities": "/probabilities", "features": "/features",
                         "rate_limits": ["6/minute"], "sanctions": {"ladder": {"block": 60}}}}),
    verify_key=lambda key: len(key) == 32)  # the test's uuid4 hex keys
'''


@pytest.fixture
def workers(redis_url, tmp_path):
    (tmp_path / "guarded_app.py").write_text(APP)
    ports = [free_port(), free_port()]
    env = {**os.environ, "GUARD_STORE": redis_url, "GUARD_TABLE": f"similarity-{uuid.uuid4().hex}"}
    processes = [subprocess.Popen([sys.executable, "-m", "uvicorn", "guarded_app:app", "--app-dir",
                                   str(tmp_path), "--port", str(port), "--log-level", "warning"], env=env)
                 for port in ports]
    try:
        for port, process in zip(ports, processes):
            wait_until_serving(f"http://127.0.0.1:{port}", 60, process)
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def post(url: str, features: list[float], key: str) -> httpx.Response:
    return httpx.post(url + "/predict", json={"features": features}, headers={"X-API-Key": key}, timeout=5)


def test_two_workers_enforce_one_limit_and_one_sanction(workers):
    key = uuid.uuid4().hex
    codes = [post(workers[i % 2], [i / 20] * 16, key).status_code for i in range(10)]
    assert codes == [200] * 6 + [429] * 4
    # a near-duplicate query on one worker raises an alarm; the other worker then blocks the client
    mallory, query = uuid.uuid4().hex, [(7 * j % 16) / 16 for j in range(16)]
    near = [query[0] + 0.001, *query[1:]]
    assert [post(workers[0], features, mallory).status_code for features in (query, near)] == [200, 200]
    time.sleep(0.3)  # the detectors run after the answer is sent; the sanction holds from then on
    assert post(workers[1], [0.5] * 16, mallory).status_code == 403
