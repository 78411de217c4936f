"""The scale-out monitor over a real redis-server: two web workers (two middleware instances) append
observations to Redis Streams, two ``guard monitor`` processes judge them, each holding half the
client partitions; a Sybil stream over 20 keys ends up sanctioned in both web workers; a monitor
that died with observations delivered to it has them taken over, and so does one killed mid-stream."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from guard.serving import prediction_app
from conftest import near
from guard import GuardMiddleware, Policy
from guard.identity import key_entry
from guard.detectors.base import Observation
from guard.monitoring.monitor import Queued
from guard.monitoring.stream import (GROUP, OFFER_BATCH, ObservationStream, StreamMonitor, decode, encode,
                                   partition_of, stream_key)
from guard.store import StoreUnavailable

pytestmark = pytest.mark.redis

D, K = 16, 3
WEIGHTS = np.random.default_rng(0).normal(size=(D, K))
PARTITIONS = 8
KEYS = [f"sybil-{i}" for i in range(20)]


def softmax(X: np.ndarray) -> np.ndarray:
    z = X @ WEIGHTS
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def policy_text(url: str) -> str:
    return f"""secret = "streams test secret 012345"
store = "{url}"
[identity]
header = "X-API-Key"
keys = {[key_entry(key) for key in (*KEYS, "alice", "mallory")]!r}
[monitor]
deployment = "streams"
partitions = {PARTITIONS}
lease = 0.5
max_pending = 1000
max_delay = 30
[detectors.similarity]
threshold = 5
window = 4
quantization = 0.1
[routes."/predict"]
probabilities = "/probabilities"
features = "/features"
[routes."/predict".sanctions]
accomplices = true
"""


def web_worker(policy: Policy) -> httpx.AsyncClient:
    app = prediction_app(softmax, D)
    app.add_middleware(GuardMiddleware, policy=policy)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guarded")


def start_monitor(path: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-m", "guard.cli", "monitor", "--policy", str(path), "--name", name],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def leases(redis: aioredis.Redis) -> dict[int, bytes | None]:
    return {p: await redis.get(f"predguard:monitor-lease:{p}") for p in range(PARTITIONS)}


async def backlog(redis: aioredis.Redis) -> int:
    return sum([await redis.xlen(stream_key("predguard:", p)) for p in range(PARTITIONS)])


def full(response: httpx.Response) -> bool:
    return response.status_code == 200 and isinstance(response.json()["probabilities"], list)


async def test_two_monitors_two_workers_sybil_and_takeover(redis_server, tmp_path):
    path = tmp_path / "guard.toml"
    path.write_text(policy_text(redis_server.url))
    policy = Policy.from_file(path)
    redis = aioredis.Redis.from_url(redis_server.url)
    workers = [web_worker(policy), web_worker(policy)]
    repeated = np.random.default_rng(1).random(D).round(3).tolist()
    # A monitor that took every partition, was handed some observations and died before judging them.
    dead = StreamMonitor(policy, name="dead")
    await dead.create_groups()
    await dead.rebalance()
    assert dead.owned == set(range(PARTITIONS))
    for i, key in enumerate(KEYS):  # near-repeats: exact repeats are no evidence
        await workers[i % 2].post("/predict", json={"features": near(repeated, i)}, headers={"x-api-key": key})
    delivered = await dead.redis.xreadgroup(GROUP, "dead", {stream_key("predguard:", p): ">"
                                                            for p in range(PARTITIONS)}, count=100)
    assert sum(len(entries) for _, entries in delivered) == len(KEYS)
    await dead.redis.aclose()
    await dead.store.close()
    monitors = [start_monitor(path, "monitor-a"), start_monitor(path, "monitor-b")]
    try:
        # the dead monitor's leases lapse; the two live ones share the partitions, half each
        async def shared() -> bool:
            owners = list((await leases(redis)).values())
            return owners.count(b"monitor-a") == owners.count(b"monitor-b") == PARTITIONS // 2
        await wait_for(shared, what="the partitions to be shared")
        # ... and judge what the dead one left pending, before anything newer
        await wait_for(lambda: _drained(redis), what="the dead monitor's pending entries")
        # the Sybil attacker goes on through both web workers; kill one monitor mid-stream
        for round_ in range(3):
            for i, key in enumerate(KEYS):
                await workers[(i + round_) % 2].post("/predict", json={"features": near(repeated, (round_ + 1) * 100 + i)},
                                                     headers={"x-api-key": key})
                if round_ == 1 and i == 10:
                    monitors[0].send_signal(signal.SIGKILL)
        monitors[0].wait(10)

        async def taken_over() -> bool:
            return set((await leases(redis)).values()) == {b"monitor-b"}
        await wait_for(taken_over, what="the surviving monitor to take every partition")
        await wait_for(lambda: _drained(redis), what="every observation to be judged")
        # every Sybil key is sanctioned, in both web workers
        for worker in workers:
            for key in KEYS:
                probe = np.random.default_rng(hash(key) % 1000).random(D).tolist()
                answer = await worker.post("/predict", json={"features": probe}, headers={"x-api-key": key})
                assert not full(answer), key
        assert full(await workers[0].post("/predict", json={"features": np.zeros(D).tolist()},
                                          headers={"x-api-key": "alice"}))
    finally:
        for monitor in monitors:
            if monitor.poll() is None:
                monitor.send_signal(signal.SIGTERM)
                monitor.wait(10)
        for worker in workers:
            await worker.aclose()
        await redis.aclose()
    assert monitors[1].returncode == 0, monitors[1].stdout.read().decode()


async def _drained(redis: aioredis.Redis) -> bool:
    """Nothing left in any partition (entries are deleted once judged) and nothing pending."""
    pending = [(await redis.xpending(stream_key("predguard:", p), GROUP))["pending"] for p in range(PARTITIONS)]
    return await backlog(redis) == 0 and not any(pending)


async def test_a_full_partition_fails_closed_and_a_client_stays_in_its_partition(redis_server, tmp_path):
    """No monitor runs: a partition takes ``max_pending`` observations, then answers fail closed
    (label-only) and are counted; the client's observations all went to one stream."""
    policy = Policy.from_dict({"secret": "streams test secret 012345", "store": redis_server.url,
                               "monitor": {"deployment": "streams", "partitions": PARTITIONS, "max_pending": 3,
                                           "max_delay": 30},
                               "detectors": {"similarity": {}}, "metrics_path": "/metrics",
                               "routes": {"/predict": {"probabilities": "/probabilities", "features": "/features"}}})
    redis = aioredis.Redis.from_url(redis_server.url)
    async with web_worker(policy) as worker:
        answers = [await worker.post("/predict", json={"features": np.full(D, i / 10).tolist()},
                                     headers={"x-api-key": "mallory"}) for i in range(5)]
        assert [full(a) for a in answers] == [True, True, True, False, False]
        assert "guard_observations_dropped_total 2.0" in (await worker.get("/metrics")).text
    # which partition holds mallory's observations depends on the hashed identity, not the raw key
    lengths = [await redis.xlen(stream_key("predguard:", p)) for p in range(PARTITIONS)]
    assert sorted(lengths) == [0] * (PARTITIONS - 1) + [3]
    await redis.aclose()


async def test_an_unjudged_observation_older_than_max_delay_fails_closed(redis_server):
    policy = Policy.from_dict({"secret": "streams test secret 012345", "store": redis_server.url,
                               "monitor": {"deployment": "streams", "max_delay": 0.05},
                               "detectors": {"similarity": {}},
                               "routes": {"/predict": {"probabilities": "/probabilities", "features": "/features"}}})
    async with web_worker(policy) as worker:
        assert full(await worker.post("/predict", json={"features": np.zeros(D).tolist()}))
        await asyncio.sleep(0.1)  # no monitor: the observation has waited beyond max_delay
        assert not full(await worker.post("/predict", json={"features": np.ones(D).tolist()}))


def test_partitions_are_stable_and_spread():
    assert partition_of("alice", 8) == partition_of("alice", 8)
    counts = np.bincount([partition_of(f"client-{i}", 8) for i in range(8000)], minlength=8)
    assert counts.min() > 800


def test_monitor_command_refuses_an_in_process_policy(tmp_path):
    path = tmp_path / "guard.toml"
    path.write_text('secret = "streams test secret 012345"\n')
    from typer.testing import CliRunner

    from guard.cli import app

    result = CliRunner().invoke(app, ["monitor", "--policy", str(path)])
    assert result.exit_code != 0 and "streams" in result.output



def stream_policy(url: str, **monitor) -> Policy:
    return Policy.from_dict({"secret": "streams test secret 012345", "store": url, "metrics_path": "/metrics",
                             "monitor": {"deployment": "streams", "partitions": PARTITIONS, **monitor},
                             "detectors": {"similarity": {}},
                             "routes": {"/predict": {"probabilities": "/probabilities", "features": "/features"}}})


def test_an_observation_is_one_packed_entry_value_and_comes_back_whole():
    rows = np.random.default_rng(2).normal(size=(3, 5))
    observation = Observation("ip:2001:db8::1 é", rows, np.array([2, 0, 7]), "/predict/ü")
    decoded = decode({b"o": encode(observation)})
    assert (decoded.client, decoded.route) == (observation.client, observation.route)
    assert decoded.features.dtype == np.float64 and np.array_equal(decoded.features, rows)
    assert np.array_equal(decoded.predicted, [2, 0, 7])


async def test_offers_made_together_each_reach_a_monitor_exactly_once(redis_server):
    """More concurrent offers than one script call takes, from many clients: each accepted, each
    appended once to its client's partition; a monitor judges every one of them once."""
    policy = stream_policy(redis_server.url, max_pending=1000, max_delay=30)
    stream = ObservationStream(redis_server.url, policy.monitor)
    clients = [f"client-{i}" for i in range(23)]
    offered = [Observation(clients[i % len(clients)], np.full((1, D), float(i)), np.array([i % K]), "/predict")
               for i in range(OFFER_BATCH + 150)]
    consumer = StreamMonitor(policy, name="only")
    try:
        await consumer.create_groups()
        assert set(await asyncio.gather(*(stream.offer(o) for o in offered))) == {Queued.ACCEPTED}
        redis = consumer.redis
        for p in range(PARTITIONS):
            entries = await redis.xrange(stream_key("predguard:", p))
            seen = [decode(fields) for _, fields in entries]
            assert all(partition_of(o.client, PARTITIONS) == p for o in seen)
            assert sorted(o.features[0, 0] for o in seen) == \
                sorted(o.features[0, 0] for o in offered if partition_of(o.client, PARTITIONS) == p)
        judged: list[Observation] = []

        async def record(batch):
            judged.extend(batch)
        consumer.monitor.process = record
        while len(judged) < len(offered):
            assert await consumer.step() > 0
        assert sorted(o.features[0, 0] for o in judged) == [float(i) for i in range(len(offered))]
        assert await consumer.step() == 0  # a full last batch is acknowledged with this read
        assert await backlog(redis) == 0
    finally:
        await stream.stop()
        await consumer.redis.aclose()
        await consumer.store.close()


async def test_concurrent_requests_past_a_full_partition_fail_closed_and_are_counted(redis_server):
    """Offers that go to Redis together are each checked against the bound: of eight concurrent
    requests of one client, with room for three, three get the full answer and five the fail mode,
    counted as dropped."""
    async with web_worker(stream_policy(redis_server.url, max_pending=3, max_delay=30)) as worker:
        answers = await asyncio.gather(*(worker.post("/predict", json={"features": np.full(D, i / 10).tolist()})
                                         for i in range(8)))
        assert sorted(full(a) for a in answers) == [False] * 5 + [True] * 3
        assert all(a.status_code == 200 for a in answers)
        assert "guard_observations_dropped_total 5.0" in (await worker.get("/metrics")).text


async def test_offers_made_together_to_an_unreachable_redis_each_raise_store_unavailable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    policy = stream_policy(f"redis://127.0.0.1:{port}/0")
    stream = ObservationStream(policy.store, policy.monitor)
    try:
        outcomes = await asyncio.gather(*(stream.offer(Observation(f"c{i}", np.zeros((1, D)), np.zeros(1, int)))
                                          for i in range(5)), return_exceptions=True)
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
    finally:
        await stream.stop()
