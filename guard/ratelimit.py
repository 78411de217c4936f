"""Per-client and global rate limits per route, in the ``limits`` library's notation
(``"100/minute"``, several at once), counted by its async strategies in a storage chosen by URI
(``async+memory://`` in one process, ``async+redis://...`` shared by all workers). The decision
carries what a ``429`` needs: ``Retry-After`` and the ``RateLimit-Limit``/``-Remaining``/``-Reset``
headers of the IETF httpapi *RateLimit header fields* draft."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import STRATEGIES
from limits.errors import StorageError
from limits.storage import storage_from_string

from guard.store.base import StoreUnavailable
from guard.store.redis import client_options


class BoundedMemoryStorage(MemoryStorage):
    """``limits``' in-process storage with a ceiling of ``max_bytes`` (at ``ENTRY_BYTES`` a key): the
    oldest keys are dropped first, and there is no background sweep walking every key (at a million
    identities ``limits``' own sweep made each request cost hundreds of milliseconds); expired keys
    go when touched or dropped. Moving windows keep only the entries their limit can look at."""

    STORAGE_SCHEME = ["async+bounded-memory"]
    # A counter key (~100 characters), its count, its expiry and its lock, measured with tracemalloc.
    ENTRY_BYTES = 700

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, max_bytes: int = 64 << 20,
                 **options: str) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.max_keys = max(1, max_bytes // self.ENTRY_BYTES)

    async def _MemoryStorage__schedule_expiry(self) -> None:  # replaces the sweep over every key
        return None

    def _bound(self) -> None:
        for table in (self.storage, self.events):
            while len(table) > self.max_keys:
                oldest = next(iter(table))
                table.pop(oldest)
                self.expirations.pop(oldest, None)
                self.locks.pop(oldest, None)

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        count = await super().incr(key, expiry, amount)
        self._bound()
        return count

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        acquired = await super().acquire_entry(key, limit, expiry, amount)
        del self.events.get(key, [])[limit:]
        self._bound()
        return acquired


def limits_storage_uri(store_uri: str) -> str:
    """The ``limits`` storage URI beside a guard store URI: ``memory://`` -> ``async+bounded-memory://``,
    ``redis://...`` -> ``async+redis://...``; a URI already in ``limits`` notation is kept."""
    scheme = urlsplit(store_uri).scheme
    if scheme.startswith("async+"):
        return store_uri
    if scheme == "memory":
        return "async+bounded-memory://"
    return "async+" + store_uri


def parse_limits(notation: str | Sequence[str]) -> tuple[RateLimitItem, ...]:
    """Limits from ``"10/second"``, ``"10/second; 1000/hour"`` or a list of such strings."""
    texts = [notation] if isinstance(notation, str) else list(notation)
    return tuple(item for text in texts for item in parse_many(text))


@dataclass(frozen=True)
class RouteLimits:
    """A route's limits: each client's own, all clients' together (``overall``), the much lower
    one a client gets while its sanction is ``throttle``, and each client network's (``per_network``,
    shared by every API key from that network)."""

    per_client: tuple[RateLimitItem, ...] = ()
    overall: tuple[RateLimitItem, ...] = ()
    throttled: tuple[RateLimitItem, ...] = ()
    per_network: tuple[RateLimitItem, ...] = ()

    @classmethod
    def parse(cls, per_client: str | Sequence[str] = (), overall: str | Sequence[str] = (),
              throttled: str | Sequence[str] = (), per_network: str | Sequence[str] = ()) -> RouteLimits:
        return cls(parse_limits(per_client), parse_limits(overall), parse_limits(throttled),
                   parse_limits(per_network))


@dataclass(frozen=True)
class LimitDecision:
    """The outcome of one hit against the tightest limit: whether it was allowed, that limit's
    size, what remains of it and the seconds until it resets."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``RateLimit-*`` headers, and ``Retry-After`` (whole seconds, at least 1) when refused."""
        reset = max(1, math.ceil(self.reset_after))
        headers = [(b"ratelimit-limit", str(self.limit).encode()),
                   (b"ratelimit-remaining", str(self.remaining).encode()),
                   (b"ratelimit-reset", str(reset).encode())]
        if not self.allowed:
            headers.append((b"retry-after", str(reset).encode()))
        return headers


class RateLimiter:
    """Counts hits with a ``limits`` strategy (``sliding-window-counter`` by default: constant
    memory per key and no burst at window edges; ``fixed-window`` or ``moving-window`` too).
    Storage errors raise ``StoreUnavailable`` after at most ``timeout`` seconds."""

    def __init__(self, storage_uri: str = "async+bounded-memory://", strategy: str = "sliding-window-counter",
                 key_prefix: str = "predguard", timeout: float = 0.25, max_bytes: int = 64 << 20):
        options: dict = {"wrap_exceptions": True}
        scheme = urlsplit(storage_uri).scheme
        if "redis" in scheme:
            options |= {"implementation": "redispy", "key_prefix": key_prefix, **client_options(timeout)}
        elif scheme == "async+bounded-memory":
            options["max_bytes"] = max_bytes
        self._strategy = STRATEGIES[strategy](storage_from_string(storage_uri, **options))

    async def hit(self, route: str, client: str, limits: RouteLimits, throttled: bool = False,
                  cost: int = 1, network: str | None = None) -> LimitDecision | None:
        """Spend ``cost`` (the request's queries) on the client's limits (plus its throttle limits
        when ``throttled``), then on its ``network``'s and the route's overall limits, stopping at
        the first refusal.
        Returns the refusing limit's decision, else the one with the least remaining; None when
        the route has no limits."""
        checks = [(item, ("client", route, client))
                  for item in limits.per_client + (limits.throttled if throttled else ())]
        checks += [(item, ("network", route, network)) for item in limits.per_network if network]
        checks += [(item, ("overall", route)) for item in limits.overall]
        tightest: LimitDecision | None = None
        try:
            for item, identifiers in checks:
                allowed = await self._strategy.hit(item, *identifiers, cost=cost)
                stats = await self._strategy.get_window_stats(item, *identifiers)
                decision = LimitDecision(allowed, item.amount, stats.remaining,
                                         max(0.0, stats.reset_time - time.time()))
                if not allowed:
                    return decision
                if tightest is None or decision.remaining < tightest.remaining:
                    tightest = decision
        except StorageError as error:
            raise StoreUnavailable(f"rate-limit storage unreachable: {error}") from error
        return tightest
