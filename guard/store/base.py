"""The protocol every state store implements: where limits' companions, detector state and
sanctions live (in the spirit of the ``limits`` library: the algorithm is separate from the storage).

Values are opaque bytes; every key expires after its ``ttl`` seconds. Implementations:
``guard.store.memory.MemoryStore`` (one process, bounded) and ``guard.store.redis.RedisStore``
(shared by all workers and replicas; atomic scripts).
"""
from __future__ import annotations

from typing import Callable, Protocol

Update = Callable[[bytes | None], bytes]


class StoreUnavailable(RuntimeError):
    """The backing store cannot be reached; the guard then follows its configured fail mode."""


class StateStore(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None if absent or expired."""

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` at ``key`` for ``ttl`` seconds."""

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    async def update(self, key: str, update: Update, ttl: float) -> bytes:
        """Atomically replace the value at ``key`` by ``update(old)`` (old is None when absent)
        and return the new value; concurrent updates of one key never lose a write."""

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        """Atomically, for each field of hash-table ``table`` in order: return its previous value
        (None if absent; a field repeated in ``fields`` sees the value its earlier occurrence set)
        and set it to ``value`` (or to ``value[i]``, one per field). The table keeps at most a
        bounded number of fields."""
