"""Shared fixtures: bundled data and small target models, trained once per test session."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from torch import nn

from guard import data, models


@pytest.fixture(scope="session", autouse=True)
def bench_cache(tmp_path_factory) -> Iterator[Path]:
    """``guard bench``'s default cache in a fresh folder: tests never read a user's cache (nor an
    earlier session's results)."""
    root = tmp_path_factory.mktemp("xdg-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root)
    yield root
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def digits() -> data.Dataset:
    return data.load("digits")


@pytest.fixture(scope="session")
def iris_model():
    """A logistic regression on iris: the model of the tutorial servers the request-shape tests guard."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris()
    return LogisticRegression(max_iter=500).fit(iris.data, iris.target)


@pytest.fixture(scope="session")
def digits_split(digits) -> data.Split:
    return data.split(digits, seed=0)


@pytest.fixture(scope="session")
def digits_mlp(digits, digits_split) -> nn.Module:
    """One-hidden-layer MLP (64 units) trained on the target half of digits (~97% test accuracy)."""
    return models.train_target("mlp", digits.X[digits_split.train], digits.y[digits_split.train],
                               digits.n_classes, seed=0, epochs=60)


@pytest.fixture(scope="session")
def digits_softmax(digits, digits_split) -> nn.Module:
    return models.train_target("softmax", digits.X[digits_split.train], digits.y[digits_split.train],
                               digits.n_classes, seed=0, epochs=60)


@pytest.fixture(scope="session")
def membership_game(digits) -> tuple[nn.Module, np.ndarray]:
    """The LiRA game: ``(model, is_member)``, an MLP trained (Adam, 60 epochs, no weight decay) on a
    random half of digits; every record of digits is a candidate."""
    member = np.zeros(len(digits.y), dtype=bool)
    member[np.random.default_rng(0).permutation(len(digits.y))[: len(digits.y) // 2]] = True
    model = models.train_target("mlp", digits.X[member], digits.y[member], digits.n_classes, seed=0, epochs=60)
    return model, member


@pytest.fixture(scope="session")
def breast_cancer() -> data.Dataset:
    return data.load("breast_cancer")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: tiny models train far faster so, above all on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served_in_thread(app, log_level: str = "warning") -> Iterator[int]:
    """``app`` under uvicorn in a thread on a free loopback port, for the ``with`` block: its port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(5)


def wait_until_serving(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url/health`` until it answers; fail at once if ``process`` (the server) exits, with
    its output when it was piped, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"the server at {url} exited: {output}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"no server at {url} after {timeout} s"
            time.sleep(0.1)


@pytest.fixture
def redis_url() -> str:
    """The test redis-server's URL (``REDIS_URL``, set by tests/run.sh). Without it the test is
    skipped, unless ``PREDGUARD_REQUIRE_REDIS=1`` makes its absence a failure."""
    url = os.environ.get("REDIS_URL")
    if not url:
        if os.environ.get("PREDGUARD_REQUIRE_REDIS") == "1":
            pytest.fail("PREDGUARD_REQUIRE_REDIS=1 but REDIS_URL is unset")
        pytest.skip("REDIS_URL is unset; tests/run.sh starts a redis-server and sets it")
    return url


class RedisServer:
    """A throwaway redis-server on a free port that a test may stop and start again."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir], stdout=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server (killable mid-test); needs the ``redis-server`` binary."""
    if shutil.which("redis-server") is None:
        if os.environ.get("PREDGUARD_REQUIRE_REDIS") == "1":
            pytest.fail("PREDGUARD_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


def guard_in(app) -> "GuardMiddleware":  # noqa: F821 (imported lazily)
    """The ``GuardMiddleware`` inside a Starlette app's middleware stack (built on its first call)."""
    from guard import GuardMiddleware

    node = app.middleware_stack
    while not isinstance(node, GuardMiddleware):
        node = node.app
    return node


async def monitor_drained(app) -> None:
    """Wait until the in-process monitor of ``app``'s guard has judged every observation."""
    await guard_in(app).monitoring.monitor.drain()


def near(features: list[float], i: int) -> list[float]:
    """A near-duplicate of ``features`` (the first value moved by ``i`` * 1e-4): not an exact repeat,
    which the similarity detector does not count as evidence."""
    return [features[0] + i * 1e-4, *features[1:]]


@pytest.fixture(scope="session")
def mlserver(tmp_path_factory) -> tuple[str, "LogisticRegression"]:  # noqa: F821 (imported lazily)
    """MLServer (KServe v2 over HTTP, its scikit-learn runtime) serving a logistic regression fitted on
    raw iris as model ``iris``, on a free port for the whole session: ``(url, model)``."""
    if importlib.util.find_spec("mlserver") is None or importlib.util.find_spec("mlserver_sklearn") is None:
        pytest.skip("mlserver and mlserver-sklearn are not installed (pip install -e '.[test]' installs them)")
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("mlserver")
    iris = load_iris()
    model = LogisticRegression(max_iter=500).fit(iris.data, iris.target)
    joblib.dump(model, folder / "model.joblib")
    port = free_port()
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": port,
        "grpc_port": free_port(), "metrics_port": free_port(), "metrics_endpoint": None}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "iris", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"}}))
    command = shutil.which("mlserver", path=str(Path(sys.executable).parent)) or shutil.which("mlserver")
    log = folder / "mlserver.log"  # a file, not a pipe: a full pipe would stall the server
    with log.open("wb") as output:
        process = subprocess.Popen([command, "start", str(folder)], cwd=folder, stdout=output,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            pytest.fail(f"mlserver exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v2/models/iris/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "mlserver did not load the model in 90 s"
        time.sleep(0.2)
    yield url, model
    process.terminate()
    process.wait(10)
