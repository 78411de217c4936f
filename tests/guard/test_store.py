"""Both state stores honour the ``StateStore`` protocol: expiry, atomic updates under concurrency,
bounded swap tables; the Redis store reports an unreachable server and recovers by itself."""
from __future__ import annotations

import asyncio
import uuid

import pytest

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guard.store import MemoryStore, StoreUnavailable, store_from_uri
from guard.store.redis import RedisStore
from guard.store.channel import RedisChannel, encode


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore(max_table_fields=100)
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"test-store:{uuid.uuid4().hex}:"
    # A generous timeout: the concurrency tests open dozens of connections at once, which on a busy
    # machine takes longer than the guard's fail-fast 0.25 s (what they test is atomicity).
    redis_store = RedisStore(url, prefix=prefix, max_table_fields=100, timeout=5.0)
    yield redis_store
    await redis_store.close()


async def test_get_set_delete_and_expiry(store):
    assert await store.get("a") is None
    await store.set("a", b"1", ttl=0.2)
    assert await store.get("a") == b"1"
    await store.delete("a")
    assert await store.get("a") is None
    await store.set("a", b"2", ttl=0.05)
    await asyncio.sleep(0.12)
    assert await store.get("a") is None


async def test_concurrent_updates_lose_no_write(store):
    def increment(old: bytes | None) -> bytes:
        return str(int(old or b"0") + 1).encode()

    results = await asyncio.gather(*(store.update("n", increment, ttl=5) for _ in range(50)))
    assert await store.get("n") == b"50"
    assert sorted(int(r) for r in results) == list(range(1, 51))


async def test_updates_of_several_keys_are_atomic_together(store):
    """Each update moves one unit from ``a`` to ``b`` and leaves ``c`` as read: interleaved
    concurrent updates never lose a unit."""
    await store.set("c", b"kept", ttl=30)

    def move(old: list[bytes | None]) -> list[bytes | None]:
        a, b, c = old
        return [str(int(a or b"100") - 1).encode(), str(int(b or b"0") + 1).encode(), c]

    await asyncio.gather(*(store.update_many(["a", "b", "c"], move, ttl=5) for _ in range(30)))
    assert [await store.get(key) for key in "abc"] == [b"70", b"30", b"kept"]


async def test_swap_many_returns_previous_values_and_expires(store):
    assert await store.swap_many("t", [b"x", b"y"], b"first", ttl=5) == [None, None]
    assert await store.swap_many("t", [b"y", b"z"], b"second", ttl=5) == [b"first", None]
    assert await store.swap_many("other", [b"y"], b"v", ttl=5) == [None]
    assert await store.swap_many("short", [b"x", b"y"], b"s", ttl=0.05) == [None, None]
    await asyncio.sleep(0.12)
    assert await store.swap_many("t", [b"x", b"y", b"z"], b"third", ttl=5) == [b"first", b"second", b"second"]
    assert await store.swap_many("short", [b"y", b"x"], b"t", ttl=0.05) == [None, None]


async def test_redis_swap_fields_expire_one_by_one(redis_url):
    """Redis stamps each field with its own expiry: a short-lived field beside long-lived ones goes
    alone (the memory store expires a generation at once: ``test_memory_swap_table_generations``)."""
    store = RedisStore(redis_url, prefix=f"test-store:{uuid.uuid4().hex}:")
    await store.swap_many("t", [b"x", b"y"], b"first", ttl=5)
    await store.swap_many("t", [b"y", b"z"], b"second", ttl=0.05)
    await asyncio.sleep(0.12)
    assert await store.swap_many("t", [b"x", b"y", b"z"], b"third", ttl=5) == [b"first", None, None]
    await store.close()


async def test_memory_swap_table_generations(monkeypatch):
    """The memory store's tables expire by generation: a field is remembered for at least half its
    ttl and never after it; the shortest ttl written into a generation bounds the whole of it."""
    clock = [1000.0]
    monkeypatch.setattr("guard.store.memory.time.monotonic", lambda: clock[0])
    store = MemoryStore()
    await store.swap_many("t", [b"a", b"e"], b"1", ttl=10)
    clock[0] += 4.9  # before half the ttl: still the current generation
    assert await store.swap_many("t", [b"b"], b"2", ttl=10) == [None]
    clock[0] += 0.2  # half the ttl after the first write: the generation becomes the previous one
    assert await store.swap_many("t", [b"a", b"c"], b"3", ttl=10) == [b"1", None]
    clock[0] += 4.8  # 9.9 after ``a`` and ``b`` were written: both still remembered
    assert await store.swap_many("t", [b"b", b"d"], b"4", ttl=10) == [b"2", None]
    clock[0] += 0.2  # their generation's ttl is over: what was written since stays, ``e`` is gone
    assert await store.swap_many("t", [b"b", b"a", b"e", b"c", b"d"], b"5", ttl=10) == [b"4", b"3", None, b"3", b"4"]
    await store.swap_many("mixed", [b"x"], b"long", ttl=10)
    await store.swap_many("mixed", [b"y"], b"short", ttl=0.1)
    clock[0] += 0.11
    assert await store.swap_many("mixed", [b"x", b"y"], b"z", ttl=10) == [None, None]


async def test_memory_swap_table_bounds_hold_and_recent_fields_stay():
    """Fields of several widths written in calls of 7: each table stays within its bytes and its
    fields, and the fields of the last half of either bound (less a call) are remembered."""
    from guard.store.memory import entry_bytes

    widest = entry_bytes(b"f" * 12, b"v" * 30)
    store = MemoryStore(max_bytes=100 * widest, max_table_fields=60)
    bytes_bound = MemoryStore(max_bytes=40 * widest)
    fields = [b"f" * (i % 5) + str(i).encode() for i in range(2_000)]
    for start in range(0, len(fields), 7):
        for table in (store, bytes_bound):
            await table.swap_many("t", fields[start:start + 7], [b"v" * (i % 30) for i in range(7)], ttl=60)
            assert table.size <= table._max_bytes and len(table._tables["t"]) <= 60
    assert sum(value is not None for value in await store.swap_many("t", fields[-23:], b"w", ttl=60)) == 23
    assert sum(value is not None for value in await bytes_bound.swap_many("t", fields[-13:], b"w", ttl=60)) == 13
    assert len(bytes_bound._tables["t"]) <= 40


async def test_memory_swap_table_larger_than_its_bound_in_one_call():
    """One call of more fields than a generation holds keeps the last ones, within the bound, and
    still sees every earlier occurrence of a repeated field."""
    store = MemoryStore(max_table_fields=10)
    fields = [str(i % 25).encode() for i in range(40)]
    found = await store.swap_many("t", fields, [str(i).encode() for i in range(40)], ttl=60)
    assert found == [None] * 25 + [str(i).encode() for i in range(15)]
    assert len(store._tables["t"]) <= 10
    assert await store.swap_many("t", [b"14", b"5", b"0"], b"x", ttl=60) == [b"39", b"30", None]


async def test_swap_many_takes_one_value_per_field_and_any_bytes(store):
    """Values and fields of any bytes (empty, the separator ':', every byte value), one value per
    field, a field repeated within a call seeing its earlier occurrence's value."""
    odd = [b"", b":", bytes(range(256)), b"\xff\xff\xff\xff", b"a:b"]
    fields = [b"f" + bytes([i]) for i in range(len(odd))] + [b"\xff" * 4, b""]
    assert await store.swap_many("bytes", fields, [*odd, b"x", b"y"], ttl=5) == [None] * len(fields)
    again = await store.swap_many("bytes", [*fields, fields[0]], [b"n"] * (len(fields) + 1), ttl=5)
    assert again == [*odd, b"x", b"y", b"n"]


async def test_swap_table_stays_bounded_and_keeps_recent_fields(store):
    fields = [str(i).encode() for i in range(1_000)]
    await store.swap_many("big", fields, b"v", ttl=60)
    recent = fields[-40:]
    assert await store.swap_many("big", recent, b"w", ttl=60) == [b"v"] * 40
    remembered = await store.swap_many("big", fields, b"w", ttl=60)
    assert sum(value is not None for value in remembered) <= 100


async def test_redis_table_cap_in_redis_itself(redis_url):
    prefix = f"test-store:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix, max_table_fields=100)
    await store.swap_many("big", [str(i).encode() for i in range(1_000)], b"v", ttl=60)
    sizes = [await store._client.hlen(f"{prefix}{{big}}:{generation}") for generation in ("cur", "prev")]
    assert sum(sizes) <= 100
    await store.close()


async def test_unreachable_redis_raises_store_unavailable():
    store = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        await store.get("a")
    with pytest.raises(StoreUnavailable):
        await store.update("a", lambda old: b"1", ttl=1)
    with pytest.raises(StoreUnavailable):
        await store.swap_many("t", [b"x"], b"1", ttl=1)
    await store.close()


async def test_redis_updates_from_stale_cached_values_lose_no_write(redis_url):
    """Two processes' stores, each updating from the values it last saw (cached): a value another
    wrote meanwhile (by an update, a ``set`` or a ``delete``) is never overwritten unseen, and an
    update reads first only when it has not seen the keys (one script call when it wrote them last)."""
    prefix = f"test-store:{uuid.uuid4().hex}:"
    first, second = (RedisStore(redis_url, prefix=prefix, timeout=5.0) for _ in range(2))
    calls = []
    channel = first._script_channel
    send = channel.call_many

    async def counted(batch):
        calls.extend(args[2] for script, _, args in batch if script is first._compare_and_set)
        return await send(batch)
    channel.call_many = counted

    def append(letter: bytes):
        return lambda old: [(old[0] or b"") + letter, old[1]]  # the second key is only read
    await first.update_many(["log", "kept"], append(b"a"), ttl=30)
    assert calls == ["kk", "wk"]  # not seen yet: read, then write
    await first.update_many(["log", "kept"], append(b"b"), ttl=30)
    assert calls[2:] == ["wk"]  # seen: one call
    await second.update_many(["log", "kept"], append(b"c"), ttl=30)
    await second.update_many(["kept", "log"], lambda old: [b"k", old[1] + b"d"], ttl=30)
    await first.update_many(["log", "kept"], append(b"e"), ttl=30)  # its cached values are stale
    assert await first.get("log") == b"abcde" and await first.get("kept") == b"k"
    await second.set("log", b"x", ttl=30)
    assert await first.update("log", lambda old: old + b"y", ttl=30) == b"xy"
    await second.delete("log")
    assert await first.update("log", lambda old: (old or b"") + b"z", ttl=30) == b"z"
    await first.close()
    await second.close()


async def test_redis_channel_keeps_replies_in_step_and_recovers(redis_url):
    """Script calls on the held connection: concurrent callers each get their own reply, an unknown
    script is loaded and run once, a killed connection is replaced, and after a timeout the late
    reply is never taken for the next call's."""
    client = aioredis.Redis.from_url(redis_url)
    channel = RedisChannel(client, timeout=0.3)
    key = f"test-channel:{uuid.uuid4().hex}"
    count = client.register_script("return redis.call('INCR', KEYS[1]) .. ARGV[1]")
    fail = client.register_script("return redis.error_reply('refused ' .. ARGV[1])")
    assert await channel.call(count, [key], [":a"]) == b"1:a"
    echo = client.register_script("return ARGV[1]")
    assert await asyncio.gather(*(channel.call(echo, [], [str(i)]) for i in range(40))) == \
        [str(i).encode() for i in range(40)]
    replies = await channel.call_many([(count, [key], [":b"]), (fail, [], ["c"]), (count, [key], [":d"])])
    assert replies[0] == b"2:b" and isinstance(replies[1], ResponseError) and replies[2] == b"3:d"
    with pytest.raises(ResponseError, match="refused e"):
        await channel.call(fail, [], ["e"])
    await client.script_flush()
    assert await channel.call(count, [key], [":f"]) == b"4:f"  # NOSCRIPT: it ran nowhere, then once
    assert await client.client_kill_filter(_type="normal", skipme=True) >= 1  # the channel's connection
    assert await channel.call(count, [key], [":g"]) == b"5:g"
    busy = client.register_script(
        "local t = redis.call('TIME') local start = t[1] * 1e6 + t[2] "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > 600000 return ARGV[1]")
    with pytest.raises(RedisTimeoutError):
        await channel.call(busy, [], ["late"])
    await asyncio.sleep(0.5)
    assert await channel.call(count, [key], [":h"]) == b"6:h"
    await channel.close()
    await client.aclose()


def test_commands_are_encoded_as_redis_py_encodes_them():
    from redis.asyncio.connection import Connection

    commands = [("EVALSHA", "a" * 40, 2, "key", "clé", 30000, b"\x00\r\n" * 3000, 1.5, -3, ""), ("PING",)]
    assert b"".join(encode(commands)) == b"".join(Connection().pack_commands(commands))


def test_redis_state_cache_is_bounded_in_bytes():
    from guard.store.memory import entry_bytes
    from guard.store.redis import StateCache
    cache = StateCache(10 * entry_bytes("k00", (bytes(1000), "v")))
    for i in range(30):
        cache.put(f"k{i:02d}", bytes(1000), "v")
    assert cache.size <= cache.max_bytes and cache.get("k29") == (bytes(1000), "v")
    assert cache.get("k00") == (None, "?")  # the least recently used went first


def test_store_from_uri(redis_url):
    assert isinstance(store_from_uri("memory://"), MemoryStore)
    assert isinstance(store_from_uri(redis_url), RedisStore)
    with pytest.raises(ValueError):
        store_from_uri("mongodb://localhost")


async def test_redis_store_recovers_when_the_server_returns(redis_server):
    store = RedisStore(redis_server.url, timeout=0.2)
    await store.set("a", b"1", ttl=60)
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await store.get("a")
    redis_server.start()
    assert await store.get("a") is None  # a fresh server: the state is gone, the store works
    await store.set("a", b"2", ttl=60)
    assert await store.get("a") == b"2"
    await store.close()


async def test_memory_store_is_bounded_in_bytes_and_evicts_the_least_recent():
    from guard.store.memory import entry_bytes

    store = MemoryStore(max_bytes=100 * entry_bytes("client-000", b"x" * 10))
    for i in range(1000):
        await store.set(f"client-{i:03d}", b"x" * 10, ttl=60)
    assert len(store) == 100 and store.size <= 100 * entry_bytes("client-000", b"x" * 10)
    assert await store.get("client-999") is not None and await store.get("client-000") is None


async def test_a_keeping_store_never_drops_a_live_key_and_refuses_new_ones_when_full():
    from guard.store.memory import StoreFull, entry_bytes

    store = MemoryStore(max_bytes=10 * entry_bytes("sanction:ip:1", b"x" * 40), evict=False)
    for i in range(10):
        await store.set(f"sanction:ip:{i}", b"x" * 40, ttl=60)
    assert store.full
    with pytest.raises(StoreFull):
        await store.set("sanction:ip:N", b"x" * 40, ttl=60)
    assert all([await store.get(f"sanction:ip:{i}") for i in range(10)])
    await store.set("sanction:ip:3", b"y" * 40, ttl=0.05)  # an existing key may change
    await asyncio.sleep(0.1)
    await store.set("sanction:ip:N", b"x" * 40, ttl=60)  # the expired key made room
    assert await store.get("sanction:ip:N") == b"x" * 40 and await store.get("sanction:ip:0")
