"""A real redis-server that fails the guard in every way but going away: full under ``noeviction``
(``OOM``), keys holding another type (``WRONGTYPE``), values that are not what the guard wrote.
Each request then gets the policy's fail mode, counted by reason, and never the raw answer nor a
bare ``500``."""
from __future__ import annotations

import uuid

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guard import GuardMiddleware, Policy
from guard.monitoring.stream import stream_key

SECRET = "store fault test secret"
RAW = [0.61234, 0.28766, 0.1]
PREFIX = "predguard:"


async def predict(request: Request) -> JSONResponse:
    return JSONResponse({"probabilities": RAW})


def guarded(store: str, fail_mode: str, **settings) -> tuple[httpx.AsyncClient, GuardMiddleware]:
    route = {"probabilities": "/probabilities", "features": "/features", "output": ["round:2"],
             "rate_limits": ["1000/minute"], "overall_rate_limits": ["100000/minute"]}
    policy = Policy(secret=SECRET, store=store, fail_mode=fail_mode, routes={"/predict": route}, **settings)
    guard = GuardMiddleware(Starlette(routes=[Route("/predict", predict, methods=["POST"])]), policy)
    peer = f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=guard, client=(peer, 4000)), base_url="http://g")
    client.peer = peer
    return client, guard


def assert_fail_mode(answer: httpx.Response, fail_mode: str) -> None:
    assert "61234" not in answer.text and "0.61" not in answer.text
    if fail_mode == "503":
        assert answer.status_code == 503 and answer.json()["error"] == "unavailable"
    else:
        assert answer.status_code == 200 and answer.json() == {"probabilities": 0}  # label only


def store_errors(guard: GuardMiddleware, reason: str) -> float:
    return guard.monitoring.metrics.store_errors.labels(reason)._value.get()


@pytest.fixture
async def server(redis_url):
    connection = aioredis.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


@pytest.mark.parametrize("fail_mode", ["label_only", "503"])
@pytest.mark.parametrize("deployment", ["in-process", "streams"])
async def test_redis_full_under_noeviction_gives_the_fail_mode(redis_url, server, fail_mode, deployment):
    # No monitor process consumes the streams here: max_delay lets the few observations wait.
    settings = {"detectors": {"similarity": {}}, "monitor": {"deployment": deployment, "max_delay": 30.0}}
    client, guard = guarded(redis_url, fail_mode, **settings)
    streams = [stream_key(PREFIX, partition) for partition in range(guard.policy.monitor.partitions)]
    await server.delete(*streams)  # no backlog left by another test
    saved = {name: (await server.config_get(name))[name] for name in ("maxmemory", "maxmemory-policy")}
    async with client:
        assert (await client.post("/predict", json={"features": [1.0, 2.0]})).json() == {
            "probabilities": [0.61, 0.29, 0.1]}
        await server.config_set("maxmemory-policy", "noeviction")
        await server.config_set("maxmemory", 1)
        try:
            answers = [await client.post("/predict", json={"features": [1.0, 2.0 + i]}) for i in range(3)]
        finally:
            await server.config_set("maxmemory", saved["maxmemory"])
            await server.config_set("maxmemory-policy", saved["maxmemory-policy"])
        recovered = await client.post("/predict", json={"features": [5.0, 6.0]})
    await server.delete(*streams)
    for answer in answers:
        assert_fail_mode(answer, fail_mode)
    assert store_errors(guard, "oom") == 3
    assert recovered.json() == {"probabilities": [0.61, 0.29, 0.1]}


@pytest.mark.parametrize("fail_mode", ["label_only", "503"])
async def test_a_sanction_key_of_another_type_gives_the_fail_mode(redis_url, server, fail_mode):
    client, guard = guarded(redis_url, fail_mode)
    key = f"{PREFIX}sanction:ip:{client.peer}"
    await server.rpush(key, b"not a sanction")
    try:
        async with client:
            answer = await client.post("/predict", json={"features": [1.0, 2.0]})
    finally:
        await server.delete(key)
    assert_fail_mode(answer, fail_mode)
    assert store_errors(guard, "wrongtype") == 1


async def counter_keys(server: aioredis.Redis, peer: str) -> list[str]:
    """The per-client one-minute counter keys of ``peer`` the admission reads now (previous,
    current, next window: the clock may turn meanwhile)."""
    seconds, micros = await server.time()
    index = (seconds * 1000 + micros // 1000) // 60_000
    return [f"{PREFIX}rl:client:/predict:ip:{peer}:1000/60:{i}" for i in (index - 1, index, index + 1)]


@pytest.mark.parametrize("value, reason", [(None, "wrongtype"), (b"many", "response_error")])
async def test_a_bad_rate_limit_counter_gives_the_fail_mode(redis_url, server, value, reason):
    client, guard = guarded(redis_url, "label_only")
    keys = await counter_keys(server, client.peer)
    for key in keys:
        if value is None:
            await server.hset(key, "count", 1)
        else:
            await server.set(key, value)
    try:
        async with client:
            answer = await client.post("/predict", json={"features": [1.0, 2.0]})
    finally:
        await server.delete(*keys)
    assert_fail_mode(answer, "label_only")
    assert store_errors(guard, reason) == 1


async def test_a_malformed_sanction_record_is_counted_as_malformed(redis_url, server):
    client, guard = guarded(redis_url, "503")
    key = f"{PREFIX}sanction:ip:{client.peer}"
    await server.set(key, b'[4, "soon"')
    try:
        async with client:
            answer = await client.post("/predict", json={"features": [1.0, 2.0]})
    finally:
        await server.delete(key)
    assert_fail_mode(answer, "503")
    assert store_errors(guard, "malformed") == 1
