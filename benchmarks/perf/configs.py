"""The guarded configurations the performance benchmarks compare, an app that answers at once
(what is left of a prediction server without its own work), and the floor of any middleware that
rewrites answers. Light to import: no torch."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from guard import GuardMiddleware, Policy

HOST = "127.0.0.1"
ROUND2 = "guard round:2"
WATERMARKED = "guard watermark:0.005 + round:2"
ALL_ON = "all on, in process"
STREAMS = "all on, streams + 1 monitor"
FLOOR = "floor: minimal rewrite"


def configurations(redis_url: str | None = None) -> list[tuple[str, Policy | None]]:
    """What is compared, baseline first: add a configuration by adding a (name, policy) pair. With
    ``redis_url``, also the scale-out deployment: Redis store, observations on Redis Streams."""
    round2 = {"probabilities": "/probabilities", "features": "/features", "output": ["round:2"]}
    # Monitoring on: generous limits that count every query but never refuse one; both detectors
    # observe every query, with thresholds that no query can cross (so the cost of observing is
    # measured, not the cheaper refusals after an alarm); metrics on.
    monitored = {**round2, "rate_limits": ["1000000/minute"], "overall_rate_limits": ["10000000/minute"]}
    everything = {"secret": "overhead benchmark secret", "routes": {"/predict": monitored},
                  "detectors": {"prada": {"delta": 0.0}, "similarity": {"threshold": 1e9}},
                  "metrics_path": "/metrics"}
    configs = [("bare", None),
               (ROUND2, Policy(secret="overhead benchmark secret", routes={"/predict": round2})),
               (WATERMARKED, Policy(secret="overhead benchmark secret", routes={"/predict": {
                   **round2, "output": ["watermark:0.005", "round:2"]}})),
               (ALL_ON, Policy(**everything))]
    if redis_url is not None:
        configs.append((STREAMS, Policy(**everything, store=redis_url, monitor={"deployment": "streams"})))
    return configs


class MinimalRewrite:
    """The least a pure-ASGI middleware that rounds JSON answers does: read the request body and
    parse it (orjson), call the app with the body replayed, parse its answer, round each
    probability to 2 places, serialise it again. No client identity, limits, validation, metrics
    or fail-closed handling: not a defence, a floor for the cost of the guard's request path."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        body = (await receive())["body"]
        orjson.loads(body)
        held: list[dict] = []

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message: dict) -> None:
            held.append(message)

        await self.app(scope, replay, capture)
        answer = orjson.loads(held[1]["body"])
        answer["probabilities"] = [round(p, 2) for p in answer["probabilities"]]
        out = orjson.dumps(answer)
        headers = [(k, v) for k, v in held[0]["headers"] if k != b"content-length"]
        await send({**held[0], "headers": [*headers, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def wrappers(configs: list[tuple[str, Policy | None]]) -> list[tuple[str, Callable]]:
    """Per configuration, what wraps an app in it (bare: nothing), then ``MinimalRewrite`` (for the
    in-process comparisons: it is not served)."""
    def wrap(policy: Policy | None) -> Callable:
        return (lambda app: app) if policy is None else (lambda app: GuardMiddleware(app, policy))
    return [(name, wrap(policy)) for name, policy in configs] + [(FLOOR, MinimalRewrite)]


def canned_app(exchanges: list[tuple[bytes, bytes]]) -> Callable:
    """An ASGI app that answers each request body of ``exchanges`` (request body, answer) with its
    answer at once: what is left of a prediction server without its own work."""
    answers = dict(exchanges)

    async def app(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        answer = answers[(await receive())["body"]]
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})
    return app


def guarded_requests(bodies: list[bytes]) -> list[tuple[dict, Callable[[], Awaitable[dict]]]]:
    """An ASGI HTTP scope and ``receive`` for a ``POST /predict`` of each of ``bodies``."""
    def replaying(body: bytes) -> Callable[[], Awaitable[dict]]:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}
        return receive

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
             "root_path": "", "server": (HOST, 80), "client": (HOST, 50000)}
    return [({**scope, "headers": [(b"host", HOST.encode()), (b"content-type", b"application/json"),
                                   (b"content-length", str(len(body)).encode())]}, replaying(body))
            for body in bodies]


async def call_in_turn(app: Callable, requests: list[tuple[dict, Callable]], start: int, stop: int) -> None:
    """Call ``app`` on requests ``start`` to ``stop`` (cycling through ``requests``), answers discarded."""
    async def discard(message: dict) -> None:
        pass

    for i in range(start, stop):
        scope, receive = requests[i % len(requests)]
        await app(dict(scope), receive, discard)
