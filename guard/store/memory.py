"""In-process state store (the default): an LRU map with per-key expiry, bounded in entries, so
a flood of new client identities cannot exhaust memory."""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from guard.store.base import Update


class _ExpiringLRU:
    """At most ``max_entries`` keys; the least recently used is evicted first; expired keys read as absent."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[object, tuple[float, object]] = OrderedDict()

    def get(self, key: object, now: float) -> object | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def set(self, key: object, value: object, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def delete(self, key: object) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class MemoryStore:
    """Implements ``guard.store.base.StateStore`` in one process. ``max_keys`` bounds the plain keys;
    ``max_table_fields`` bounds each ``swap_many`` table."""

    def __init__(self, max_keys: int = 100_000, max_table_fields: int = 1_000_000):
        self._keys = _ExpiringLRU(max_keys)
        self._tables: dict[str, _ExpiringLRU] = {}
        self._max_table_fields = max_table_fields
        self._lock = asyncio.Lock()

    async def get(self, key: str) -> bytes | None:
        return self._keys.get(key, time.monotonic())

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._keys.set(key, value, time.monotonic() + ttl)

    async def delete(self, key: str) -> None:
        self._keys.delete(key)

    async def update(self, key: str, update: Update, ttl: float) -> bytes:
        async with self._lock:
            now = time.monotonic()
            value = update(self._keys.get(key, now))
            self._keys.set(key, value, now + ttl)
            return value

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        now = time.monotonic()
        entries = self._tables.setdefault(table, _ExpiringLRU(self._max_table_fields))
        previous = []
        for field, new in zip(fields, [value] * len(fields) if isinstance(value, bytes) else value):
            previous.append(entries.get(field, now))
            entries.set(field, new, now + ttl)
        return previous

    def __len__(self) -> int:
        """Keys currently held (expired ones may still count until touched or evicted)."""
        return len(self._keys)
