"""Rate limits: per client, overall, throttled; several limits at once; batch cost; shared
through Redis by separate limiters (as separate workers would be); unreachable storage reported."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from guard.ratelimit import (
    BoundedMemoryStorage,
    LimitDecision,
    RateLimiter,
    RouteLimits,
    limits_storage_uri,
    parse_limits,
)
from guard.store import StoreUnavailable


def test_notation():
    assert [(item.amount, item.get_expiry()) for item in parse_limits(["10/second", "1000/hour"])] == \
        [(10, 1), (1000, 3600)]
    assert len(parse_limits("10/second; 1000/hour")) == 2
    assert limits_storage_uri("memory://") == "async+bounded-memory://"
    assert limits_storage_uri("redis://h:1/2") == "async+redis://h:1/2"
    assert limits_storage_uri("async+redis://h:1/2") == "async+redis://h:1/2"


async def test_per_client_limit_refuses_with_headers():
    limiter = RateLimiter()
    limits = RouteLimits.parse(per_client="3/minute")
    decisions = [await limiter.hit("/p", "alice", limits) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    headers = dict(decisions[-1].headers())
    assert headers[b"ratelimit-limit"] == b"3" and headers[b"ratelimit-remaining"] == b"0"
    assert 1 <= int(headers[b"retry-after"]) <= 60
    assert b"retry-after" not in dict(decisions[0].headers())
    assert (await limiter.hit("/p", "bob", limits)).allowed
    assert (await limiter.hit("/other", "alice", limits)).allowed


async def test_overall_limit_spans_clients():
    limiter = RateLimiter()
    limits = RouteLimits.parse(per_client="10/minute", overall="5/minute")
    allowed = [(await limiter.hit("/p", f"client-{i}", limits)).allowed for i in range(7)]
    assert allowed == [True] * 5 + [False] * 2


async def test_throttled_client_gets_the_lower_limit():
    limiter = RateLimiter()
    limits = RouteLimits.parse(per_client="100/minute", throttled="2/minute")
    throttled = [(await limiter.hit("/p", "mallory", limits, throttled=True)).allowed for _ in range(3)]
    assert throttled == [True, True, False]
    assert (await limiter.hit("/p", "alice", limits, throttled=False)).allowed


async def test_tightest_of_several_limits_and_batch_cost():
    limiter = RateLimiter(strategy="fixed-window")
    limits = RouteLimits.parse(per_client=["4/second", "100/hour"])
    first = await limiter.hit("/p", "alice", limits, cost=3)
    assert first == LimitDecision(True, 4, 1, first.reset_after) and first.reset_after <= 1
    refused = await limiter.hit("/p", "alice", limits, cost=3)
    assert not refused.allowed and refused.limit == 4
    await asyncio.sleep(1.05)
    assert (await limiter.hit("/p", "alice", limits, cost=3)).allowed


async def test_no_limits_no_decision():
    assert await RateLimiter().hit("/p", "alice", RouteLimits()) is None


async def test_two_limiters_share_one_limit_through_redis(redis_url):
    prefix = f"test-rl-{uuid.uuid4().hex}"
    workers = [RateLimiter(limits_storage_uri(redis_url), key_prefix=prefix) for _ in range(2)]
    limits = RouteLimits.parse(per_client="6/minute")
    allowed = [(await workers[i % 2].hit("/p", "alice", limits)).allowed for i in range(10)]
    assert allowed == [True] * 6 + [False] * 4


async def test_unreachable_redis_raises_store_unavailable():
    limiter = RateLimiter("async+redis://127.0.0.1:1/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        await limiter.hit("/p", "alice", RouteLimits.parse(per_client="1/second"))


async def test_memory_counters_are_bounded_and_never_swept_all_at_once():
    limiter = RateLimiter(max_bytes=1000 * BoundedMemoryStorage.ENTRY_BYTES)
    storage = limiter._strategy.storage
    for i in range(5000):
        await limiter.hit("/p", f"ip:10.0.{i // 250}.{i % 250}", RouteLimits.parse("5/minute"))
    assert len(storage.storage) <= 1000 and len(storage.locks) <= 1000
    assert storage.timer is None  # limits' own sweep walks every key on the event loop
    for strategy in ("moving-window", "fixed-window"):
        limiter = RateLimiter(strategy=strategy, max_bytes=10 * BoundedMemoryStorage.ENTRY_BYTES)
        for i in range(100):
            await limiter.hit("/p", "alice", RouteLimits.parse("3/minute"))
            await limiter.hit("/p", f"ip:{i}", RouteLimits.parse("3/minute"))
        storage = limiter._strategy.storage
        assert len(storage.storage) + len(storage.events) <= 20
        assert all(len(events) <= 3 for events in storage.events.values())
