"""The monitor off the request path: batch verdicts identical to one query at a time, the bounded
queue (a full queue or a stalled monitor fails closed and is counted; a flood cannot hide queries),
the sanction delay, and the in-process monitor's start and stop on the ASGI lifespan."""
from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest

from guard.serving import prediction_app
from conftest import guard_in, monitor_drained, near
from guard import GuardMiddleware, Policy
from guard.metrics import GuardMetrics
from guard.detectors import build_detector
from guard.detectors.base import Observation, with_array
from guard.monitoring.monitor import Monitor, watches
from guard.sanctions import Sanctions
from guard.store.memory import MemoryStore

D, K = 16, 3
WEIGHTS = np.random.default_rng(0).normal(size=(D, K))
SECRET = "monitor test secret 0123"
SIMILARITY = {"similarity": {"threshold": 5, "window": 4, "quantization": 0.1}}


def softmax(X: np.ndarray) -> np.ndarray:
    z = X @ WEIGHTS
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mixed_stream(rng: np.random.Generator, requests: int = 600) -> list[Observation]:
    """Seven clients: random queries, tiny steps along a line, and near-repeats; some requests of
    three rows."""
    base = rng.random((8, 24))
    stream = []
    for i in range(requests):
        rows = 3 if i % 5 == 0 else 1
        kind = i % 7
        if kind == 3:
            x = base[i % 3] + 0.002 * (i // 7) + rng.normal(0, 1e-4, (rows, 24))
        elif kind == 5:
            x = base[(i // 7) % 4] + rng.normal(0, 0.01, (rows, 24))
        else:
            x = rng.random((rows, 24))
        x = np.clip(x, 0, 1)
        stream.append(Observation(f"c{kind}", x, (x.sum(axis=1) * 5).astype(int) % 4, "/predict"))
    return stream


DETECTORS = {"prada": {"max_set": 16, "max_distances": 200, "delta": 0.97},
             "similarity": {"salt": "t", "window": 6, "top_n": 16, "quantization": 0.1, "threshold": 6}}


@pytest.mark.parametrize("name", sorted(DETECTORS))
async def test_batches_judge_exactly_as_one_query_at_a_time(name, rng):
    stream = mixed_stream(rng)
    one_by_one = build_detector(name, DETECTORS[name], MemoryStore())
    batched = build_detector(name, DETECTORS[name], MemoryStore())
    expected = [await one_by_one.observe(o.client, o.features, o.predicted) for o in stream]
    judged = []
    for start in range(0, len(stream), 41):
        judged += await batched.observe_batch(stream[start : start + 41])
    assert judged == expected
    assert sum(v.alarm for v in expected) >= 10  # the stream exercises alarms, not only quiet verdicts


@pytest.mark.redis
async def test_similarity_batches_over_redis_judge_as_in_memory(redis_url, rng):
    import uuid

    from guard.store.redis import RedisStore

    stream = mixed_stream(rng, 200)
    redis = RedisStore(redis_url, prefix=f"test-monitor-{uuid.uuid4().hex}:")
    try:
        shared = build_detector("similarity", DETECTORS["similarity"], redis)
        local = build_detector("similarity", DETECTORS["similarity"], MemoryStore())
        for start in range(0, len(stream), 25):
            batch = stream[start : start + 25]
            assert await shared.observe_batch(batch) == await local.observe_batch(batch)
    finally:
        await redis.close()


async def test_monitor_raises_sanctions_in_query_order_as_one_at_a_time(rng):
    """A floor on one detector makes the ladder depend on the order of alarms: a batch must climb
    it exactly as the queries did one by one."""
    policy = Policy(secret=SECRET, detectors=DETECTORS, routes={"/predict": {
        "probabilities": "/p", "features": "/f", "sanctions": {"floors": {"similarity": "degrade"}}}})
    stream = mixed_stream(rng, 300)
    standings = []
    for batch_size in (1, 50):
        store = MemoryStore()
        sanctions = Sanctions(store, clock=lambda: 1000.0)
        monitor = Monitor.from_policy(policy, MemoryStore(), sanctions.escalate, GuardMetrics())
        for start in range(0, len(stream), batch_size):
            await monitor.process(stream[start : start + batch_size])
        standings.append([await sanctions.standing(f"c{kind}") for kind in range(7)])
    assert standings[0] == standings[1]
    assert any(s.level > 0 for s in standings[0])


def test_routes_watch_their_configured_detectors():
    policy = Policy(secret=SECRET, detectors=DETECTORS, routes={
        "/all": {"probabilities": "/p", "features": "/f"},
        "/one": {"probabilities": "/p", "features": "/f", "detectors": ["prada"]}})
    assert watches(policy)["/all"].detectors == {"prada", "similarity"}
    assert watches(policy)["/one"].detectors == {"prada"}


def guarded(monitor: dict, fail_mode: str = "label_only", **route) -> tuple[httpx.AsyncClient, object]:
    policy = Policy(secret=SECRET, detectors=SIMILARITY, fail_mode=fail_mode, monitor=monitor,
                    metrics_path="/metrics",
                    routes={"/predict": {"probabilities": "/probabilities", "features": "/features", **route}})
    app = prediction_app(softmax, D)
    app.add_middleware(GuardMiddleware, policy=policy)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guarded")
    return client, app


def stall(app) -> threading.Event:
    """Make the app's monitor hang on its next batch until the returned event is set."""
    monitor = guard_in(app).monitoring.monitor.monitor
    release = threading.Event()
    process = monitor.process

    async def stalled(batch):
        await asyncio.to_thread(release.wait)
        await process(batch)
    monitor.process = stalled
    return release


def full(response: httpx.Response) -> bool:
    return response.status_code == 200 and isinstance(response.json()["probabilities"], list)


def query(seed: int) -> list[float]:
    return np.random.default_rng(seed).random(D).round(3).tolist()


async def test_a_flood_against_a_stalled_monitor_gets_nothing_unwatched():
    """The monitor hangs; an attacker floods. Only ``max_pending`` answers go out in full (each of
    them queued for the detectors); every other one is label-only and counted as dropped. When the
    monitor resumes, every query that was answered in full is judged."""
    client, app = guarded({"max_pending": 4, "max_delay": 0.05})
    async with client:
        await client.post("/predict", json={"features": query(0)}, headers={"x-api-key": "warm"})
        await monitor_drained(app)
        release = stall(app)
        repeated = query(1)
        answers = await asyncio.gather(*(client.post("/predict", json={"features": near(repeated, i)},
                                                     headers={"x-api-key": "mallory"}) for i in range(30)))
        assert sum(full(a) for a in answers) == 4
        assert all(a.status_code == 200 and isinstance(a.json()["probabilities"], int)
                   for a in answers if not full(a))
        metrics = (await client.get("/metrics")).text
        assert "guard_observations_dropped_total 26.0" in metrics
        assert 'decision="unmonitored"' in metrics
        release.set()
        await monitor_drained(app)
        # the four queued near-repeats were judged: three alarms (log, degrade, throttle) for mallory
        metrics = (await client.get("/metrics")).text
        assert 'guard_detections_total{detector="similarity"} 3.0' in metrics
        assert not full(await client.post("/predict", json={"features": query(2)},
                                          headers={"x-api-key": "mallory"}))


async def test_stalled_monitor_under_503_refuses():
    client, app = guarded({"max_pending": 1, "max_delay": 0.02}, fail_mode="503")
    async with client:
        assert full(await client.post("/predict", json={"features": query(0)}))
        await monitor_drained(app)
        release = stall(app)
        assert full(await client.post("/predict", json={"features": query(1)}))
        refused = await client.post("/predict", json={"features": query(2)})
        assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
        release.set()
        await monitor_drained(app)
        assert full(await client.post("/predict", json={"features": query(3)}))


async def test_a_busy_monitor_makes_requests_wait_within_max_delay_not_fail():
    """A request finding the queue full waits for room (up to ``max_delay``) instead of failing."""
    client, app = guarded({"max_pending": 1, "max_delay": 2.0})
    async with client:
        await client.post("/predict", json={"features": query(0)})
        await monitor_drained(app)
        release = stall(app)
        first = await client.post("/predict", json={"features": query(1)})
        waiting = asyncio.ensure_future(client.post("/predict", json={"features": query(2)}))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        release.set()
        assert full(first) and full(await waiting)


async def test_monitor_thread_starts_and_stops_with_the_lifespan():
    client, app = guarded({})
    events: asyncio.Queue = asyncio.Queue()
    sent: list[str] = []

    async def send(message):
        sent.append(message["type"])

    await events.put({"type": "lifespan.startup"})
    lifespan = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                         events.get, send))
    while "lifespan.startup.complete" not in sent:
        await asyncio.sleep(0.01)
    monitor = guard_in(app).monitoring.monitor
    thread = monitor._thread
    assert thread is not None and thread.is_alive()
    async with client:
        assert full(await client.post("/predict", json={"features": query(0)}))
    await events.put({"type": "lifespan.shutdown"})
    await lifespan
    assert sent[-1] == "lifespan.shutdown.complete"
    assert not thread.is_alive() and monitor._thread is None
    assert not monitor.backlog.times  # what was queued was judged before the thread ended


async def test_with_max_pending_one_a_sequential_client_is_sanctioned_from_the_next_query():
    """No waiting for the monitor in the test: the bound itself makes the sanction of each alarm
    apply to the client's next query (log, degrade, throttle on the 2nd, 3rd, 4th near-repeat)."""
    for attempt in range(5):
        client, app = guarded({"max_pending": 1, "max_delay": 5.0}, rate_limits=["100/minute"])
        async with client:
            repeated = query(attempt)
            answers = [await client.post("/predict", json={"features": near(repeated, i)},
                                         headers={"x-api-key": "mallory"}) for i in range(5)]
        assert [full(a) for a in answers] == [True, True, True, False, False]


def test_streams_need_a_redis_store():
    with pytest.raises(ValueError, match="needs a Redis store"):
        Policy(secret=SECRET, detectors=SIMILARITY, monitor={"deployment": "streams"})
    Policy(secret=SECRET, detectors=SIMILARITY, store="redis://127.0.0.1:1/0", monitor={"deployment": "streams"})


def test_with_array_converts_listed_feature_rows_once_and_keeps_arrays():
    listed = Observation("c", [[1, 2.5], [3.0, 4.0]], [0, 1], "/p")
    converted = with_array(listed)
    assert converted.features.dtype == np.float64 and converted.features.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert (converted.client, converted.predicted, converted.route) == ("c", [0, 1], "/p")
    assert with_array(converted) is converted


def test_a_monitor_outliving_the_servers_event_loop_ends_without_a_traceback(caplog):
    """Without a lifespan nothing stops the monitor: the server's event loop may close while the
    worker thread still judges. Its alarms then write no sanction (an error line, no traceback) and
    the thread ends."""
    client, app = guarded({"max_pending": 64, "max_delay": 5.0})
    release = None

    async def queries() -> None:
        nonlocal release
        async with client:
            await client.post("/predict", json={"features": query(0)})
            release = stall(app)  # the next batch waits until the loop has closed
            for i in range(8):
                await client.post("/predict", json={"features": near(query(1), i)})

    asyncio.run(queries())
    monitor = guard_in(app).monitoring.monitor
    monitor.idle = 0.05
    thread = monitor._thread
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert not [r for r in caplog.records if r.exc_info or "Event loop is closed" in r.getMessage()]
    assert any("no sanction was written" in r.getMessage() for r in caplog.records)
