"""The guarded API a cell attacks: the keys it has issued, the guard's policy for a defence, a fresh
prediction server behind ``GuardMiddleware``, and an ``HTTPTarget`` on it (in process through httpx's
ASGI transport, or over a loopback socket to uvicorn)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI

from attacks.sybil import KeyRotatingTarget
from attacks.targets import HTTPTarget
from benchmarks import models
from benchmarks.grid import DEFAULT_MAX_BODY_BYTES
from benchmarks.scenarios import Context, Defence
from guard import GuardMiddleware, Policy
from guard.identity import key_entry
from guard.serving import prediction_app

SYBIL_KEYS = 20
"""How many keys the Sybil attacker sends through at once."""
KEY_POOL = 200
"""How many keys the key-rotating attacker holds in all (``attacks.sybil.KeyRotatingTarget``)."""
KEY_RATE_PER_HOUR = 1000
"""The per-key rate limit the monitoring rows price the attacker's time at (rows an hour per key): the bench
does not enforce it (that would conflate rate limiting with detection), it converts queries into hours."""
BENIGN_KEY = "benign-user"
# The keys the bench's API has issued: the benign user's and the Sybil attacker's registered accounts.
ATTACKER_KEYS = tuple(f"attacker-{i}" for i in range(KEY_POOL))
ISSUED_KEYS = (BENIGN_KEY, *ATTACKER_KEYS)



def policy(defence: Defence, detectors: dict[str, dict[str, Any]] | None = None,
           max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Policy:
    """The guard policy that serves ``defence`` on ``/predict``; ``detectors`` are the calibrated
    detector settings when ``defence.monitoring``."""
    route = {"probabilities": "/probabilities", "features": "/features", "output": list(defence.output)}
    settings: dict[str, Any] = {"secret": "predguard-benchmark-secret", "routes": {"/predict": route},
                                "max_body_bytes": max_body_bytes,
                                "identity": {"header": "X-API-Key", "keys": [key_entry(k) for k in ISSUED_KEYS]}}
    if defence.monitoring:  # cross-client alarms sanction every key they matched (Sybil keys)
        settings["detectors"] = detectors
        route["sanctions"] = {"accomplices": True}
        # The monitor judges off the request path; with one observation pending at most, a request
        # waits for the judgement of the one before it, so the attacker (who sends its next request
        # after the last answer) is caught from the request after the alarm, as the report counts.
        # A slow machine must not pass for a caught attacker: the wait may take up to 60 s.
        settings["monitor"] = {"max_pending": 1, "max_delay": 60.0}
    return Policy.from_dict(settings)


def guarded_app(context: Context, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A fresh prediction server for the context's model behind a fresh ``GuardMiddleware`` (no
    guard state carries over between attacks)."""
    model = context.model
    app = prediction_app(lambda X: models.predict_proba(model, X), context.dataset.n_features)
    app.add_middleware(GuardMiddleware, policy=policy(context.defence, context.detectors, max_body_bytes))
    return app


JSON_BYTES_PER_FEATURE = 26
"""The most a float64 feature takes in a JSON request body (``-0.00012345678901234567, ``)."""


def rows_per_request(n_features: int, max_body_bytes: int, most: int = 512) -> int:
    """How many feature rows fit one request body under the guard's limit ``max_body_bytes``."""
    return max(1, min(most, (max_body_bytes - 64) // (JSON_BYTES_PER_FEATURE * n_features + 4)))


@contextlib.contextmanager
def http_target(app: FastAPI, n_classes: int, n_features: int, live: bool, api_keys: list[str],
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Iterator[HTTPTarget]:
    """An ``HTTPTarget`` for ``app``: in-process (ASGI transport) or over loopback to uvicorn, its
    requests sized to the guard's body limit."""
    with _endpoint(app, live) as connect, connect(api_keys, n_classes, n_features, max_body_bytes) as target:
        yield target


@contextlib.contextmanager
def rotating_target(app: FastAPI, n_classes: int, n_features: int, live: bool, keys: list[str], active: int,
                    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Iterator[KeyRotatingTarget]:
    """The key-rotating Sybil attacker's view of ``app``: ``active`` of ``keys`` at once, each sanctioned
    key dropped and its rows resent through a fresh one."""
    with _endpoint(app, live) as connect, KeyRotatingTarget(
            lambda key: connect([key], n_classes, n_features, max_body_bytes), keys, n_classes, active=active,
            rows_per_request=rows_per_request(n_features, max_body_bytes)) as target:
        yield target


@contextlib.contextmanager
def _endpoint(app: FastAPI, live: bool) -> Iterator[Callable[..., HTTPTarget]]:
    """``connect(api_keys, n_classes, n_features, max_body_bytes)``: a fresh ``HTTPTarget`` on ``app``,
    in process or over loopback to uvicorn."""
    def connect(api_keys: list[str], n_classes: int, n_features: int, max_body_bytes: int) -> HTTPTarget:
        # An attacker throttled for more than a second gives up (the rotating one drops the key): the bench
        # records whether and when monitoring throttled it, not how long a patient attacker would wait.
        return HTTPTarget(url, n_classes, client=client, n_features=n_features, api_keys=api_keys, max_wait=1.0,
                          batch_size=rows_per_request(n_features, max_body_bytes))

    if not live:
        url, client = "http://guarded/predict", app
        yield connect
        return
    with _serve(app) as port:
        url, client = f"http://127.0.0.1:{port}/predict", None
        yield connect


@contextlib.contextmanager
def _serve(app: FastAPI) -> Iterator[int]:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join()
