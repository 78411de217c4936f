"""The protocol every state store implements: where limits' companions, detector state and
sanctions live (in the spirit of the ``limits`` library: the algorithm is separate from the storage).

Values are opaque bytes; every key expires after its ``ttl`` seconds. Implementations:
``guard.store.memory.MemoryStore`` (one process, bounded) and ``guard.store.redis.RedisStore``
(shared by all workers and replicas; atomic scripts).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

from guard import sanction_record

Update = Callable[[bytes | None], bytes]
UpdateMany = Callable[[list[bytes | None]], list[bytes]]


@dataclass(slots=True)  # built on every request (see ``Charge``)
class WindowLimit:
    """A rate limit's counter: at most ``amount`` queries per ``seconds`` under ``key``."""

    key: str
    amount: int
    seconds: float


@dataclass(slots=True)  # built on every request (see ``Charge``)
class WindowCount:
    """A counter as ``admit`` found it: queries in the current window, in the previous one, and the
    fraction of the current window elapsed. The sliding-window count weighs the previous window by
    what of it still overlaps the last ``seconds``: ``previous * (1 - elapsed) + current``."""

    current: int
    previous: int
    elapsed: float

    def used(self) -> float:
        return self.previous * (1.0 - self.elapsed) + self.current


@dataclass(slots=True)  # built on every request (see ``Charge``)
class Admitted:
    """What ``admit`` read and did: the client's standing record (raw); ``blocked``: a block was in
    force and nothing was charged; ``counts``: each limit applied, as found before charging (up to
    and including the refusing one); ``refused``: the index of the first limit the query would
    exceed (nothing charged), or None (every limit charged)."""

    standing: bytes | None
    blocked: bool
    counts: tuple[WindowCount, ...] = ()
    refused: int | None = None


@dataclass(slots=True)  # built on every request: a plain slotted class is the cheapest to construct
class Charge:
    """One admission: the standing's key; the limits to charge, and those charged only while the
    standing is ``throttle_level``; ``cost`` queries; ``sliding`` (else fixed) windows; ``now`` (wall
    seconds) to read the standing's expiry with; ``network_key``: the standing of the client's
    network, which applies instead when it is higher (None: not read). A standing record starts
    ``[level, until, ...]`` (``guard.sanction_record``)."""

    standing_key: str
    limits: Sequence[WindowLimit]
    throttle_limits: Sequence[WindowLimit]
    cost: int
    sliding: bool
    now: float
    throttle_level: int
    block_level: int
    network_key: str | None = None

    def exceeds(self, limit: WindowLimit, count: WindowCount) -> bool:
        return count.used() + self.cost > limit.amount

    def level(self, standing: bytes | None) -> int:
        """The level a standing record puts in force now (``sanction_record.level_in_force``)."""
        return sanction_record.level_in_force(standing, self.now)


class StoreUnavailable(RuntimeError):
    """The backing store failed a call (``reason``: unreachable, timeout, oom, wrongtype, malformed,
    ...); the guard then follows its configured fail mode."""

    def __init__(self, message: str, reason: str = "unreachable") -> None:
        super().__init__(message)
        self.reason = reason


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

    async def update_many(self, keys: list[str], update: UpdateMany, ttl: float) -> list[bytes]:
        """``update`` for several keys as one atomic step: ``update(old values)`` gives the new ones
        (a value returned as the very object read is left as it is)."""

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        """Atomically, for each field of hash-table ``table`` in order: return its previous value
        (None if absent; a field repeated in ``fields`` sees the value its earlier occurrence set)
        and set it to ``value`` (or to ``value[i]``, one per field). The table keeps at most a
        bounded number of fields, as two generations (a field is read in the current one, else the
        previous one, and written to the current one, which replaces the previous one when full), so
        the fields written last are remembered. A value is never returned after its ``ttl``: Redis
        expires each field on its own, the memory store a generation at a time (after half the
        shortest ttl written into it, a generation becomes the previous one; at all of it, it goes),
        so there a field may be forgotten after half its ttl."""

    async def admit(self, charge: Charge) -> Admitted:
        """In one round trip: read the standing at ``charge.standing_key`` (or at ``network_key``
        when that one is higher); unless a block is in force, charge ``cost`` to every limit (the
        throttle limits too while throttled) if none would be exceeded, else to none."""
