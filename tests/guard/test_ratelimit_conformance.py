"""The admission rule (``guard.ratelimit.admit``), the memory store and the Redis store's script give
the same admissions on random request sequences: random clients, networks, costs, limits, sliding or
fixed windows, the clock advancing (across window boundaries too), and sanctions (the client's and
its network's) raised and lapsing. Each store runs on the test's clock: the memory store's wall clock
is replaced, and the Redis script reads the clock from a key instead of the server's ``TIME``."""
from __future__ import annotations

import asyncio
import time
import types
import uuid
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from guard import ratelimit, sanction_record
from guard.sanctions import Level, Sanctions
from guard.store import memory
from guard.store.base import Admitted, Charge, WindowLimit
from guard.store.memory import MemoryStore
from guard.store.redis import _ADMIT, SERVER_CLOCK, RedisStore

START_MS = 1_765_000_000_000  # a wall-clock time in milliseconds: the sequences start there
CLIENTS = ("alice", "bob", "carol")
NETWORKS = ("net:10.0.0.0/24", "net:10.0.1.0/24")
THROTTLE, BLOCK = int(Level.THROTTLE), int(Level.BLOCK)


@dataclass(frozen=True)
class Request:
    client: str
    network: str | None
    cost: int


@dataclass(frozen=True)
class Sanction:
    """A standing written for ``who`` (a client or a network): ``level`` until ``lasts_ms`` from now."""

    who: str
    level: int
    lasts_ms: int


@dataclass(frozen=True)
class Advance:
    ms: int


@dataclass(frozen=True)
class Limits:
    """Each as (amount, window in seconds); ``sliding`` (else fixed) windows."""

    per_client: tuple[tuple[int, float], ...]
    per_network: tuple[tuple[int, float], ...]
    overall: tuple[tuple[int, float], ...]
    throttled: tuple[tuple[int, float], ...]
    sliding: bool


class SpecStore:
    """The rule on its own, over plain per-window counts that never expire."""

    def __init__(self) -> None:
        self.standings: dict[str, bytes] = {}
        self.counts: dict[tuple[str, int], int] = {}

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.standings[key] = value

    def admit(self, charge: Charge, now_ms: int) -> Admitted:
        covering = None if charge.network_key is None else self.standings.get(charge.network_key)

        def read(key: str, index: int) -> tuple[int, int]:
            return self.counts.get((key, index), 0), self.counts.get((key, index - 1), 0)

        standing = self.standings.get(charge.standing_key)
        admitted, charged = ratelimit.admit(charge, standing, covering, now_ms, read)
        if covering is not None and admitted.standing is covering and covering != standing:
            event("the network's standing applied")
        if charge.throttle_limits and len(admitted.counts) > len(charge.limits):
            event("throttled")
        for key, index, _, _ in charged:
            self.counts[key, index] = self.counts.get((key, index), 0) + charge.cost
        return admitted


def charge_of(request: Request, limits: Limits, now_ms: int) -> Charge:
    """The charge ``ratelimit.Admission`` would make of ``request``."""
    def named(kind: str, who: str, items: tuple[tuple[int, float], ...]) -> list[WindowLimit]:
        return [WindowLimit(f"rl:{kind}:{who}:{i}", amount, seconds) for i, (amount, seconds) in enumerate(items)]

    applied = named("client", request.client, limits.per_client)
    if request.network is not None:
        applied += named("network", request.network, limits.per_network)
    applied += named("overall", "all", limits.overall)
    return Charge(Sanctions.key(request.client), applied, named("throttle", request.client, limits.throttled),
                  request.cost, limits.sliding, now_ms / 1000, THROTTLE, BLOCK,
                  None if request.network is None else Sanctions.key(request.network))


window = st.tuples(st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0, 3.0]))
windows = st.lists(window, max_size=2).map(tuple)
limit_sets = st.builds(Limits, windows, windows, windows, st.lists(window, min_size=1, max_size=2).map(tuple),
                       st.booleans())
requests = st.builds(Request, st.sampled_from(CLIENTS), st.sampled_from((None, *NETWORKS)), st.integers(1, 4))
levels = st.sampled_from([0, int(Level.LOG), int(Level.DEGRADE), THROTTLE, THROTTLE, BLOCK])
sanctions = st.builds(Sanction, st.sampled_from((*CLIENTS, *CLIENTS, *NETWORKS)), levels, st.integers(1, 6000))
advances = st.builds(Advance, st.one_of(st.integers(0, 2500), st.sampled_from([250, 500, 1000, 2000])))
# A step: a burst of requests made at once (Redis admits them in one script call), a sanction, or time.
bursts = st.lists(requests, min_size=1, max_size=4)
steps = st.lists(st.one_of(bursts, bursts, sanctions, sanctions, advances), min_size=4, max_size=40)


class Clock:
    def __init__(self) -> None:
        self.ms = START_MS

    def wall(self) -> float:
        """The wall time the memory store reads, which it turns back into exactly ``ms``."""
        return (self.ms + 0.5) / 1000


async def run(redis_url: str, limits: Limits, sequence: list, clock: Clock) -> list[tuple[Admitted, ...]]:
    """Each admission of ``sequence`` by the spec, the memory store and the Redis store."""
    prefix = f"test-conformance:{uuid.uuid4().hex}:"
    redis_store = RedisStore(redis_url, prefix=prefix, timeout=5.0)
    clock_key = prefix + "now"
    redis_store._admit = redis_store._client.register_script(  # the test's clock for the server's
        _ADMIT.replace(SERVER_CLOCK, f"local now = tonumber(redis.call('GET', '{clock_key}'))"))
    memory_store, spec = MemoryStore(), SpecStore()
    outcomes = []
    try:
        await redis_store._client.set(clock_key, clock.ms)
        for step in sequence:
            if isinstance(step, Advance):
                clock.ms += step.ms
                await redis_store._client.set(clock_key, clock.ms)
            elif isinstance(step, Sanction):
                record = sanction_record.encode(step.level, (clock.ms + step.lasts_ms) / 1000, step.level,
                                                clock.ms / 1000)
                for store in (spec, memory_store, redis_store):
                    await store.set(Sanctions.key(step.who), record, ttl=3600)
            else:
                charges = [charge_of(request, limits, clock.ms) for request in step]
                expected = [spec.admit(charge, clock.ms) for charge in charges]
                in_memory = await asyncio.gather(*(memory_store.admit(charge) for charge in charges))
                in_redis = await asyncio.gather(*(redis_store.admit(charge) for charge in charges))
                outcomes += zip(expected, in_memory, in_redis)
    finally:
        await redis_store.close()
    return outcomes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limit_sets, sequence=steps)
def test_the_stores_admit_as_the_rule_does(redis_url, monkeypatch, limits, sequence):
    clock = Clock()
    monkeypatch.setattr(memory, "time", types.SimpleNamespace(time=clock.wall, monotonic=time.monotonic))
    for expected, in_memory, in_redis in asyncio.run(run(redis_url, limits, sequence, clock)):
        assert in_memory == expected
        assert in_redis == expected
        event("blocked" if expected.blocked else "refused" if expected.refused is not None else "charged")


def test_the_redis_script_reads_the_server_clock():
    """The conformance test swaps exactly the script's clock line, which must be there."""
    assert _ADMIT.count(SERVER_CLOCK) == 1
    assert "redis.call('TIME')" not in _ADMIT.replace(SERVER_CLOCK, "")
