"""The guard command: loopback-only serving, and the demo end to end under uvicorn."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import free_port, wait_until_serving
from typer.testing import CliRunner

from guard.cli import app, is_loopback


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                         ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                         ("::", False), ("example.com", False)])
def test_only_loopback_hosts_count_as_local(host, local):
    assert is_loopback(host) is local


def test_demo_refuses_remote_hosts_without_allow_remote():
    result = CliRunner().invoke(app, ["demo", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--allow-remote" in result.output


def test_demo_serves_a_guarded_model_over_http(digits, digits_split):
    port = free_port()
    command = [sys.executable, "-c", "from guard.cli import main; main()",
               "demo", "--port", str(port), "--epochs", "5"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, 120, server)
        X = digits.X[digits_split.test[:20]]
        served = httpx.post(f"{url}/predict", json={"features": X.tolist()}).json()["probabilities"]
        served = np.asarray(served)
        np.testing.assert_allclose(served * 100, np.rint(served * 100), atol=1e-9)  # round:2 on the wire
        np.testing.assert_allclose(served.sum(axis=1), 1.0)
        assert (served.argmax(axis=1) == digits.y[digits_split.test[:20]]).mean() >= 0.7
        assert httpx.post(f"{url}/predict", content=b"{not json").status_code == 400
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert re.search(r"curl -s -X POST http://127\.0\.0\.1:\d+/predict", output)
    assert "training an MLP on digits" in output and "what the guard sends (round:2)" in output
    assert "guard: POST /predict -> 400 invalid_json" in output  # under uvicorn's logging


def test_the_runtime_commands_need_only_the_library():
    code = ("import sys, guard.cli; loaded = sorted({m.split('.')[0] for m in sys.modules} & {'attacks', "
            "'benchmarks'}); print(loaded)")
    script = f"import importlib.metadata as m; m.entry_points = lambda group: []; {code}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
