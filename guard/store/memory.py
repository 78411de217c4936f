"""In-process state store (the default): maps with per-key expiry, bounded in bytes, so a flood of
new client identities cannot exhaust memory, and every operation costs the same however many clients
are held (no sweep over all keys: expired keys are dropped when touched or evicted).

Two kinds of bound: detector state is *evicting* (the least recently used key makes room); sanctions
are *keeping* (``evict=False``): a key is never dropped before it expires, and when the store is
full of live keys a new one is refused with ``StoreFull``, so old blocks are never forgotten."""
from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict

from guard.store.base import Admitted, Charge, Update, UpdateMany, WindowCount

# What one entry costs beyond its key and value: the dict slot, the (expiry, value) tuple, the float,
# the objects' headers (measured with tracemalloc at about 250 bytes on CPython 3.11).
ENTRY_OVERHEAD = 300


class StoreFull(RuntimeError):
    """A keeping store holds ``max_bytes`` of live entries and cannot take a new key."""


def entry_bytes(key: object, value: object) -> int:
    """What an entry costs: ``ENTRY_OVERHEAD``, its key, and its value (bytes; an int; a tuple of ints)."""
    if isinstance(value, tuple):
        size = 40 * len(value)
    else:
        size = 8 if isinstance(value, int) else len(value)  # type: ignore[arg-type]
    return ENTRY_OVERHEAD + len(key) + size  # type: ignore[arg-type]


class _ExpiringMap:
    """Keys with an expiry, at most ``max_bytes`` (by ``entry_bytes``) in all. Evicting: the least
    recently used key goes first. Keeping: expired keys go (earliest expiry first), live ones never."""

    def __init__(self, max_bytes: int, evict: bool = True, max_entries: int | None = None):
        self.max_bytes, self.evict, self.size = max_bytes, evict, 0
        self.max_entries = max_entries
        self._items: OrderedDict[object, tuple[float, object]] = OrderedDict()
        self._expiries: list[tuple[float, object]] = []  # keeping maps: a heap, stale entries skipped

    def get(self, key: object, now: float) -> object | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= now:
            self.delete(key)
            return None
        self._items.move_to_end(key)
        return value

    def set(self, key: object, value: object, expires: float, now: float) -> None:
        old = self._items.get(key)
        grown = entry_bytes(key, value) - (entry_bytes(key, old[1]) if old else 0)
        if not self.evict and old is None:
            self._purge(now, grown)
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        self.size += grown
        if self.evict:
            while len(self._items) > 1 and self._over():
                oldest, (_, evicted) = self._items.popitem(last=False)
                self.size -= entry_bytes(oldest, evicted)
        else:
            heapq.heappush(self._expiries, (expires, key))
            if len(self._expiries) > 2 * len(self._items) + 16:  # drop stale heap entries, amortised
                self._expiries = [(e, k) for k, (e, _) in self._items.items()]
                heapq.heapify(self._expiries)

    def replace(self, key: object, value: object, expires: float) -> None:
        """Give a key just read (``get``) a new value of the same ``entry_bytes``, in place."""
        self._items[key] = (expires, value)

    def swap(self, keys: list, values: list, expires: float, now: float) -> list:
        """For each key in order, its live value (None if absent or expired), then ``values[i]`` set
        in its place until ``expires`` (evicting maps: ``set`` for many keys in one pass)."""
        items, size, previous = self._items, self.size, []
        get, move_to_end, remember = items.get, items.move_to_end, previous.append
        entry = None
        for key, value in zip(keys, values):
            old = get(key)
            if old is None:
                remember(None)
                size += ENTRY_OVERHEAD + len(key) + len(value)
            else:
                remember(old[1] if old[0] > now else None)
                size += len(value) - len(old[1])
                move_to_end(key)
            if entry is None or entry[1] is not value:  # a query's fields share one entry
                entry = (expires, value)
            items[key] = entry
        ceiling, most = self.max_bytes, len(items) if self.max_entries is None else self.max_entries
        while len(items) > 1 and (size > ceiling or len(items) > most):  # ``_over``, inlined: once per eviction
            oldest, (_, evicted) = items.popitem(last=False)
            size -= ENTRY_OVERHEAD + len(oldest) + len(evicted)
        self.size = size
        return previous

    def _over(self) -> bool:
        return self.size > self.max_bytes or (self.max_entries is not None and len(self._items) > self.max_entries)

    def _purge(self, now: float, needed: int) -> None:
        """Drop expired keys, earliest first, until ``needed`` bytes fit; ``StoreFull`` if they do not."""
        while self.size + needed > self.max_bytes and self._expiries and self._expiries[0][0] <= now:
            expires, key = heapq.heappop(self._expiries)
            item = self._items.get(key)
            if item is not None and item[0] == expires:
                self.delete(key)
        if self.size + needed > self.max_bytes:
            raise StoreFull(f"the store holds {self.size} bytes of live entries (ceiling {self.max_bytes})")

    def full(self, now: float) -> bool:
        """Whether a new key would be refused now (keeping maps only; evicting ones always take it)."""
        if self.evict or self.size + ENTRY_OVERHEAD + 64 <= self.max_bytes:  # room without a purge
            return False
        try:
            self._purge(now, ENTRY_OVERHEAD + 64)
        except StoreFull:
            return True
        return False

    def delete(self, key: object) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.size -= entry_bytes(key, item[1])

    def __len__(self) -> int:
        return len(self._items)


class MemoryStore:
    """Implements ``guard.store.base.StateStore`` in one process: at most ``max_bytes`` for the plain
    keys and for each ``swap_many`` table (which also holds at most ``max_table_fields`` fields).
    ``evict=False`` keeps live keys (see the module docstring). Rate-limit counters (``admit``) are
    kept apart, in at most ``counter_bytes``, the least recently used evicted first."""

    def __init__(self, max_bytes: int = 64 << 20, max_table_fields: int = 1_000_000, evict: bool = True,
                 counter_bytes: int = 16 << 20):
        self._keys = _ExpiringMap(max_bytes, evict)
        self._counters = _ExpiringMap(counter_bytes)
        self._tables: dict[str, _ExpiringMap] = {}
        self._max_bytes = max_bytes
        self._max_table_fields = max_table_fields
        self._lock = asyncio.Lock()

    @property
    def full(self) -> bool:
        """Whether a new key would be refused (``StoreFull``) now."""
        return self._keys.full(time.monotonic())

    @property
    def size(self) -> int:
        """Bytes held, by ``entry_bytes``, keys and tables together."""
        return self._keys.size + self._counters.size + sum(table.size for table in self._tables.values())

    async def get(self, key: str) -> bytes | None:
        return self._keys.get(key, time.monotonic())

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        now = time.monotonic()
        self._keys.set(key, value, now + ttl, now)

    async def delete(self, key: str) -> None:
        self._keys.delete(key)

    async def update(self, key: str, update: Update, ttl: float) -> bytes:
        return (await self.update_many([key], lambda values: [update(values[0])], ttl))[0]

    async def update_many(self, keys: list[str], update: UpdateMany, ttl: float) -> list[bytes]:
        async with self._lock:
            now = time.monotonic()
            old = [self._keys.get(key, now) for key in keys]
            new = update(old)
            for key, before, value in zip(keys, old, new, strict=True):
                if value is not before:
                    self._keys.set(key, value, now + ttl, now)
            return new

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        now = time.monotonic()
        entries = self._tables.get(table)
        if entries is None:
            entries = self._tables[table] = _ExpiringMap(self._max_bytes, max_entries=self._max_table_fields)
        return entries.swap(fields, [value] * len(fields) if isinstance(value, bytes) else value, now + ttl, now)

    async def admit(self, charge: Charge) -> Admitted:
        """One admission, as one synchronous step on the event loop (nothing can interleave).
        Counter windows are numbered on the wall clock, as in Redis (server time)."""
        standing = self._keys.get(charge.standing_key, time.monotonic())
        level = charge.level(standing)
        if level >= charge.block_level:
            return Admitted(standing, blocked=True)
        limits = list(charge.limits)
        if level == charge.throttle_level:
            limits += charge.throttle_limits
        now = time.time()
        counters, counts, charged = self._counters, [], []
        for limit in limits:
            index, offset = divmod(now, limit.seconds)
            # One entry per counter, read and written once: (its window's number since the epoch,
            # the queries in that window, those in the window before it).
            window = counters.get(limit.key, now)
            if window is not None and window[0] == index:
                current, previous = window[1], window[2]
            else:
                current, previous = 0, window[1] if window is not None and window[0] == index - 1 else 0
            count = WindowCount(current, previous if charge.sliding else 0, offset / limit.seconds)
            counts.append(count)
            if charge.exceeds(limit, count):
                return Admitted(standing, False, tuple(counts), len(counts) - 1)
            charged.append((limit.key, (index, current + charge.cost, previous),
                            (index + (2 if charge.sliding else 1)) * limit.seconds, window is not None))
        for key, window, expires, held in charged:
            if held:  # read just now (and made the most recent): the same size, so only its value changes
                counters.replace(key, window, expires)
            else:
                counters.set(key, window, expires, now)
        return Admitted(standing, False, tuple(counts))

    def __len__(self) -> int:
        """Keys currently held (expired ones may still count until touched or evicted)."""
        return len(self._keys)
