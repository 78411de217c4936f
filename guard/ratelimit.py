"""Per-client, per-network and global rate limits per route, in the ``limits`` library's notation
(``"100/minute"``, several at once), counted in the guard's state store together with the client's
sanction, in one round trip per request (``Admission``). The decision carries what a ``429`` needs:
``Retry-After`` and the ``RateLimit-Limit``/``-Remaining``/``-Reset`` headers of the IETF httpapi
*RateLimit header fields* draft."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from limits import RateLimitItem, parse_many

from guard.sanctions import Level, Sanctions, Standing, network_of
from guard.store.base import Charge, StateStore, WindowCount, WindowLimit

Strategy = Literal["sliding-window-counter", "fixed-window"]
THROTTLE, BLOCK = int(Level.THROTTLE), int(Level.BLOCK)  # the store's view of the ladder
STRATEGIES: tuple[str, ...] = get_args(Strategy)


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
    _counters: dict[str, RouteCounters] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def parse(cls, per_client: str | Sequence[str] = (), overall: str | Sequence[str] = (),
              throttled: str | Sequence[str] = (), per_network: str | Sequence[str] = ()) -> RouteLimits:
        return cls(parse_limits(per_client), parse_limits(overall), parse_limits(throttled),
                   parse_limits(per_network))

    def counters(self, route: str) -> RouteCounters:
        """The counters of these limits on ``route``, named once per route (not on every request)."""
        found = self._counters.get(route)
        if found is None:
            found = self._counters[route] = RouteCounters(
                tuple(Counter.of(item, "client", route) for item in self.per_client),
                tuple(Counter.of(item, "network", route) for item in self.per_network),
                tuple(window(item, "overall", route) for item in self.overall),
                tuple(Counter.of(item, "throttle", route) for item in self.throttled))
        return found


@dataclass(frozen=True)
class Counter:
    """A limit counted per client or per network on one route: its key around the one counted."""

    prefix: str
    suffix: str
    amount: int
    seconds: int

    @classmethod
    def of(cls, item: RateLimitItem, kind: str, route: str) -> Counter:
        prefix, suffix = window(item, kind, route, "\0").key.split("\0")  # no NUL in a route or a kind
        return cls(prefix, suffix, item.amount, item.get_expiry())

    def limit(self, who: str) -> WindowLimit:
        return WindowLimit(self.prefix + who + self.suffix, self.amount, self.seconds)


@dataclass(frozen=True)
class RouteCounters:
    """A route's limits with their counters named: per client, per network, overall, throttled."""

    per_client: tuple[Counter, ...]
    per_network: tuple[Counter, ...]
    overall: tuple[WindowLimit, ...]
    throttled: tuple[Counter, ...]


@dataclass(slots=True)  # built on every request (see ``store.base.Charge``)
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


class Admission:
    """Reads a client's standing sanction and charges its rate limits in one store round trip
    (``StateStore.admit``: one Lua script on Redis, one synchronous step in memory): a blocked client
    is charged nothing; a throttled one is charged its route's throttle limits too; a query that
    would exceed any limit is charged to none (a refused client cannot spend the overall budget).
    Counters are sliding windows (``sliding-window-counter``, the default: constant memory per key,
    no burst at window edges; the count weighs the previous window by its overlap) or fixed ones.
    With ``network_sanctions``, the standing of the client address's network applies when higher."""

    def __init__(self, store: StateStore, sanctions: Sanctions, strategy: str = "sliding-window-counter",
                 clock: Callable[[], float] = time.time, network_sanctions: bool = False):
        if strategy not in STRATEGIES:
            raise ValueError(f"rate-limit strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        self._store = store
        self._sanctions = sanctions
        self._sliding = strategy == "sliding-window-counter"
        self._clock = clock
        self._network_sanctions = network_sanctions

    async def admit(self, route: str, client: str, limits: RouteLimits, cost: int = 1,
                    network: str | None = None, address: str = "") -> tuple[Standing, LimitDecision | None]:
        """The client's standing (or its address's network's), and the refusing limit's decision,
        else the one with the least remaining (None: no limit applied, or blocked).
        ``StoreUnavailable`` when the store fails or the standing is unreadable."""
        counters = limits.counters(route)
        applied = [counter.limit(client) for counter in counters.per_client]
        if network and counters.per_network:
            applied += [counter.limit(network) for counter in counters.per_network]
        applied += counters.overall
        throttled = [counter.limit(client) for counter in counters.throttled] if counters.throttled else []
        covering = network_of(address) if self._network_sanctions and address else None
        admitted = await self._store.admit(Charge(
            Sanctions.key(client), applied, throttled, cost, self._sliding, self._clock(), THROTTLE, BLOCK,
            Sanctions.key(covering) if covering else None))
        standing = self._sanctions.read(admitted.standing)
        if admitted.blocked or not admitted.counts:
            return standing, None
        charged, counts, refused = [*applied, *throttled], admitted.counts, admitted.refused
        if refused is not None:
            return standing, self.decide(charged[refused], counts[refused], cost, True)
        lefts = [remaining(limit, count, cost) for limit, count in zip(charged, counts)]
        tightest = lefts.index(min(lefts))  # the least remaining after this query (ties: the first)
        return standing, self.decide(charged[tightest], counts[tightest], cost, False)

    def decide(self, limit: WindowLimit, count: WindowCount, cost: int, refused: bool) -> LimitDecision:
        """What the client is told about ``limit`` after this query: what remains, and when it is
        refused or used the last of it, the seconds until it (or the next query) would fit."""
        if refused:
            return LimitDecision(False, limit.amount, max(0, math.floor(limit.amount - count.used())),
                                 self.wait(limit, count, cost))
        left = remaining(limit, count, cost)
        if left:  # the reset: the current window's end
            return LimitDecision(True, limit.amount, left, (1.0 - count.elapsed) * limit.seconds)
        # None left: the reset a pacing client waits for is when the next query fits (with a sliding
        # window, this window's queries still weigh on the next one).
        charged = WindowCount(count.current + cost, count.previous, count.elapsed)
        return LimitDecision(True, limit.amount, 0, self.wait(limit, charged, 1))

    def wait(self, limit: WindowLimit, count: WindowCount, cost: int) -> float:
        """Seconds until ``cost`` more queries fit under ``limit``: a fixed window's end; in a sliding
        window, until the previous window's weight has fallen enough, or into the next window."""
        room = limit.amount - cost
        if count.used() <= room:
            return 0.0
        if room < 0:  # a batch larger than the limit never fits
            return 2.0 * limit.seconds
        if not self._sliding:
            return (1.0 - count.elapsed) * limit.seconds
        if count.previous and count.current <= room:
            return max(0.0, 1.0 - (room - count.current) / count.previous - count.elapsed) * limit.seconds
        later = 1.0 - room / count.current if count.current else 0.0
        return (1.0 - count.elapsed + max(0.0, later)) * limit.seconds


def remaining(limit: WindowLimit, count: WindowCount, cost: int) -> int:
    """Whole queries left under ``limit`` once ``cost`` more are charged to ``count``."""
    return max(0, math.floor(limit.amount - count.used() - cost))


def window(item: RateLimitItem, *scope: str) -> WindowLimit:
    """The counter of ``item`` (e.g. 100/minute) for ``scope`` (kind, route, who)."""
    return WindowLimit(f"rl:{':'.join(scope)}:{item.amount}/{item.get_expiry()}", item.amount, item.get_expiry())
