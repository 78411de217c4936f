"""Admission: the standing sanction read and the rate limits charged in one store call, in memory and
through a real Redis (two stores as two workers would hold them); per client, per network, overall and
throttled limits; a refused or blocked query charges nothing; sliding-window arithmetic; unreachable
storage reported; memory counters bounded."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from guard.ratelimit import Admission, LimitDecision, RouteLimits, parse_limits
from guard.sanctions import Level, SanctionRules, Sanctions, Standing
from guard.store import MemoryStore, StoreUnavailable, store_from_uri
from guard.store.base import WindowCount, WindowLimit


def test_notation():
    assert [(item.amount, item.get_expiry()) for item in parse_limits(["10/second", "1000/hour"])] == \
        [(10, 1), (1000, 3600)]
    assert len(parse_limits("10/second; 1000/hour")) == 2


@pytest.fixture(params=["memory", "redis"])
def stores(request):
    """Two handles on one state store, as two workers hold it (memory: the same object)."""
    if request.param == "memory":
        store = MemoryStore(evict=False)
        return [store, store]
    url = request.getfixturevalue("redis_url")
    prefix = f"test-admit-{uuid.uuid4().hex}:"
    return [store_from_uri(url, prefix=prefix) for _ in range(2)]


def admissions(stores, strategy: str = "sliding-window-counter", clock=None):
    options = {} if clock is None else {"clock": clock}
    return [Admission(store, Sanctions(store, **options), strategy, **options) for store in stores]


async def test_per_client_limit_refuses_with_headers(stores):
    admission = admissions(stores)[0]
    limits = RouteLimits.parse(per_client="3/minute")
    decisions = [(await admission.admit("/p", "alice", limits))[1] for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    headers = dict(decisions[-1].headers())
    assert headers[b"ratelimit-limit"] == b"3" and headers[b"ratelimit-remaining"] == b"0"
    assert 1 <= int(headers[b"retry-after"]) <= 120
    assert b"retry-after" not in dict(decisions[0].headers())
    assert (await admission.admit("/p", "bob", limits))[1].allowed
    assert (await admission.admit("/other", "alice", limits))[1].allowed


async def test_two_workers_share_limits_and_a_refusal_charges_nothing(stores):
    workers = admissions(stores)
    limits = RouteLimits.parse(per_client="2/minute", overall="5/minute")
    # alice's third query is refused by her own limit: it must not spend the overall budget.
    alice = [(await workers[i % 2].admit("/p", "alice", limits))[1].allowed for i in range(3)]
    others = [(await workers[i % 2].admit("/p", client, limits))[1].allowed
              for i, client in enumerate(["bob", "bob", "carol", "dave"])]
    assert alice == [True, True, False] and others == [True, True, True, False]


async def test_network_limit_spans_the_keys_of_a_network(stores):
    admission = admissions(stores)[0]
    limits = RouteLimits.parse(per_client="10/minute", per_network="3/minute")
    allowed = [(await admission.admit("/p", f"key:{i}", limits, network="net:10.0.0.0/24"))[1].allowed
               for i in range(4)]
    assert allowed == [True, True, True, False]
    assert (await admission.admit("/p", "key:9", limits, network="net:10.0.1.0/24"))[1].allowed


async def test_throttle_limits_apply_while_throttled_and_a_block_charges_nothing(stores):
    now = [1000.0]
    admission = admissions(stores, clock=lambda: now[0])[0]
    limits = RouteLimits.parse(per_client="5/minute", throttled="2/minute")
    await stores[0].set(Sanctions.key("mallory"), Standing(Level.THROTTLE, 1100.0).encode(), ttl=600)
    throttled = [await admission.admit("/p", "mallory", limits) for _ in range(3)]
    assert [standing.level for standing, _ in throttled] == [Level.THROTTLE] * 3
    assert [decision.allowed for _, decision in throttled] == [True, True, False]
    await stores[0].set(Sanctions.key("mallory"), Standing(Level.BLOCK, 1100.0).encode(), ttl=600)
    for _ in range(5):
        standing, decision = await admission.admit("/p", "mallory", limits)
        assert standing.level == Level.BLOCK and decision is None
    now[0] = 1200.0  # the block has lapsed: the blocked queries were never charged
    standing, decision = await admission.admit("/p", "mallory", limits)
    # Two throttled queries were charged.
    assert standing.level == Level.NONE and decision.allowed and decision.remaining == 5 - 2 - 1


async def test_batch_cost_and_fixed_windows(stores):
    admission = admissions(stores, "fixed-window")[0]
    limits = RouteLimits.parse(per_client=["4/second", "100/hour"])
    _, first = await admission.admit("/p", "alice", limits, cost=3)
    assert first == LimitDecision(True, 4, 1, first.reset_after) and first.reset_after <= 1
    _, refused = await admission.admit("/p", "alice", limits, cost=3)
    assert not refused.allowed and refused.limit == 4
    await asyncio.sleep(1.05)
    _, again = await admission.admit("/p", "alice", limits, cost=3)
    assert again.allowed and again.limit == 4


async def test_malformed_standing_is_store_unavailable(stores):
    await stores[0].set(Sanctions.key("eve"), b"not a standing", ttl=60)
    with pytest.raises(StoreUnavailable):
        await admissions(stores)[0].admit("/p", "eve", RouteLimits.parse(per_client="3/minute"))


def test_sliding_window_arithmetic():
    admission = Admission(MemoryStore(), Sanctions(MemoryStore()))
    limit = WindowLimit("k", 10, 60.0)
    # Half-way through a window after 10 queries in the previous one: 5 still count.
    half = WindowCount(current=0, previous=10, elapsed=0.5)
    assert half.used() == 5.0
    assert admission.decide(limit, half, cost=1, refused=False) == LimitDecision(True, 10, 4, 30.0)
    # 5 now and 10 before, half-way: full; one more fits once the previous weighs 4, i.e. at 0.6.
    full = WindowCount(current=5, previous=10, elapsed=0.5)
    assert admission.wait(limit, full, cost=1) == pytest.approx(6.0)
    # 10 now: only in the next window, once this one's weight has fallen to 9 (a tenth into it).
    assert admission.wait(limit, WindowCount(10, 0, 0.5), cost=1) == pytest.approx(36.0)
    assert admission.wait(limit, WindowCount(0, 0, 0.5), cost=11) == 120.0  # never fits
    assert admission.wait(limit, half, cost=1) == 0.0  # fits now
    # The last unit used: the reset is when the next query fits, not this window's end.
    assert admission.decide(limit, WindowCount(9, 0, 0.5), cost=1, refused=False) == \
        LimitDecision(True, 10, 0, pytest.approx(36.0))


async def test_unreachable_redis_raises_store_unavailable():
    store = store_from_uri("redis://127.0.0.1:1/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        await Admission(store, Sanctions(store)).admit("/p", "alice", RouteLimits.parse(per_client="1/second"))


async def test_admissions_made_together_count_each_query_once_in_order(stores):
    """Concurrent admissions made in one turn of the event loop (on Redis: one script call): each
    is counted once, in the order made, and the limit refuses exactly the excess; another client's
    and a blocked client's admissions in the same turn are judged on their own."""
    now = [1000.0]
    admission = admissions(stores, clock=lambda: now[0])[0]
    limits = RouteLimits.parse(per_client="5/minute", overall="100/minute")
    await stores[0].set(Sanctions.key("mallory"), Standing(Level.BLOCK, 1100.0).encode(), ttl=600)
    calls = [("alice", 1)] * 7 + [("bob", 2), ("mallory", 1), ("alice", 1)]
    outcomes = await asyncio.gather(*(admission.admit("/p", client, limits, cost) for client, cost in calls))
    alice = [decision for (client, _), (_, decision) in zip(calls, outcomes) if client == "alice"]
    assert [d.allowed for d in alice] == [True] * 5 + [False] * 3
    assert [d.remaining for d in alice] == [4, 3, 2, 1, 0, 0, 0, 0]
    (_, bob), (mallory, blocked) = outcomes[7], outcomes[8]
    assert bob.allowed and bob.remaining == 3
    assert mallory.level == Level.BLOCK and blocked is None
    # the overall counter holds alice's 5 and bob's 2: the refused and the blocked queries charged nothing
    _, overall = await admission.admit("/p", "carol", RouteLimits.parse(overall="100/minute"))
    assert overall.remaining == 100 - 7 - 1


async def test_redis_sends_the_admissions_of_one_turn_in_one_call(redis_url):
    store = store_from_uri(redis_url, prefix=f"test-admit-{uuid.uuid4().hex}:")
    calls = []
    channel = store._admission_channel
    send = channel.call_many

    async def counted(batch):
        calls.extend(len(args) for _, _, args in batch)
        return await send(batch)
    channel.call_many = counted
    admission = Admission(store, Sanctions(store))
    limits = RouteLimits.parse(per_client="3/minute")
    decisions = [d for _, d in await asyncio.gather(*(admission.admit("/p", "alice", limits) for _ in range(6)))]
    assert calls == [6] and [d.allowed for d in decisions] == [True] * 3 + [False] * 3
    assert not (await admission.admit("/p", "alice", limits))[1].allowed and calls == [6, 1]
    await store.close()


async def test_admissions_made_together_to_an_unreachable_redis_each_raise_store_unavailable():
    store = store_from_uri("redis://127.0.0.1:1/0", timeout=0.2)
    admission = Admission(store, Sanctions(store))
    outcomes = await asyncio.gather(*(admission.admit("/p", f"client-{i}", RouteLimits.parse(per_client="1/second"))
                                      for i in range(5)), return_exceptions=True)
    assert len(outcomes) == 5 and all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)


async def test_memory_counters_are_bounded():
    store = MemoryStore(evict=False, counter_bytes=1000 * 400)
    admission = Admission(store, Sanctions(store))
    for i in range(5000):
        await admission.admit("/p", f"ip:10.0.{i // 250}.{i % 250}", RouteLimits.parse("5/minute"))
    assert store._counters.size <= 1000 * 400 and 0 < len(store._counters) < 1500 and len(store) == 0


async def test_memory_sliding_windows_weigh_the_previous_window_and_forget_older_ones(monkeypatch):
    """The memory store keeps one entry per counter (its window, that window's queries and the
    window's before): the previous window weighs by its overlap, one further back not at all."""
    import guard.store.memory as memory

    now = [6000.0]  # the start of a one-minute window
    monkeypatch.setattr(memory.time, "time", lambda: now[0])
    store = MemoryStore(evict=False)
    admission = Admission(store, Sanctions(store))
    limits = RouteLimits.parse(per_client="10/minute")
    remaining = [(await admission.admit("/p", "alice", limits))[1].remaining for _ in range(6)]
    assert remaining == [9, 8, 7, 6, 5, 4]
    now[0] = 6090.0  # half-way through the next window: the six weigh three
    assert (await admission.admit("/p", "alice", limits))[1].remaining == 10 - 3 - 1
    now[0] = 6150.0  # half-way through the one after: the one query of the last window weighs a half
    assert (await admission.admit("/p", "alice", limits))[1].remaining == 8
    now[0] = 6300.0  # two windows later: nothing counts any more
    assert (await admission.admit("/p", "alice", limits))[1].remaining == 9
    for _ in range(9):
        await admission.admit("/p", "alice", limits)
    assert not (await admission.admit("/p", "alice", limits))[1].allowed  # 10 in this window: refused


@pytest.mark.parametrize("scope", ["network", "client"])
async def test_a_network_scoped_block_covers_the_addresses_network(stores, scope):
    """With network scope, blocking one address blocks its /24 (IPv4) or /64 (IPv6), whatever the
    client's name there (another address, an API key); the next network and other clients are not."""
    sanctions = Sanctions(stores[0])
    rules = SanctionRules.parse(ladder={"block": 600}, network=scope == "network")
    await sanctions.escalate("ip:203.0.113.7", rules, "similarity")
    await sanctions.escalate("ip:2001:db8:1:2::7", rules, "similarity")
    admission = Admission(stores[1], Sanctions(stores[1]), network_sanctions=True)
    limits = RouteLimits.parse(per_client="100/minute")

    async def level(client: str, address: str) -> Level:
        return (await admission.admit("/p", client, limits, address=address))[0].level

    neighbours = [("ip:203.0.113.200", "203.0.113.200"), ("key:abc", "203.0.113.9"),
                  ("ip:2001:db8:1:2::ffff", "2001:db8:1:2::ffff")]
    strangers = [("ip:203.0.114.7", "203.0.114.7"), ("ip:2001:db8:1:3::7", "2001:db8:1:3::7")]
    assert await level("ip:203.0.113.7", "203.0.113.7") == Level.BLOCK
    for client, address in neighbours:
        assert await level(client, address) == (Level.BLOCK if scope == "network" else Level.NONE)
    for client, address in strangers:
        assert await level(client, address) == Level.NONE
