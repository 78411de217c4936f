"""Graduated sanctions: ``none < log < degrade < throttle < block``, each lasting a configured time.
A detector's alarm raises the client's standing one step up the route's ladder (or straight to the
detector's configured floor); the highest level a client reached is remembered for ``memory``
seconds after it lapses, so a client that alarms again resumes above it. Standings live in a
``StateStore`` keyed by client, so every worker sees them and they apply on every guarded route.
In process that store is their own, apart from detector state, and never drops a live standing:
when it is full, a client without a standing is degraded rather than an old block forgotten. A
record that cannot be read raises ``MalformedStanding`` (a ``StoreUnavailable``: the fail mode).
The middleware enforces them: ``log`` only logs, ``degrade`` selects the route's degraded output,
``throttle`` adds the route's throttle limits, ``block`` answers ``403``. Under rules with
``network`` scope, a block of an address client also blocks its network (``network_of``: its /24 or
/64), for as long: every request from there is refused, whatever its key."""
from __future__ import annotations

import functools
import ipaddress
import logging
import time
from datetime import datetime, timezone
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from guard import sanction_record
from guard.store.base import StateStore, StoreUnavailable

log = logging.getLogger("guard.sanctions")


class Level(IntEnum):
    NONE = 0
    LOG = 1
    DEGRADE = 2
    THROTTLE = 3
    BLOCK = 4

    @classmethod
    def named(cls, name: str | Level) -> Level:
        return name if isinstance(name, Level) else cls[name.upper()]


DEFAULT_LADDER = {Level.LOG: 300.0, Level.DEGRADE: 900.0, Level.THROTTLE: 3600.0, Level.BLOCK: 86400.0}
NETWORK_PREFIXES = {4: 24, 6: 64}  # what a network-wide block covers around an address


@functools.lru_cache(maxsize=4096)
def network_of(address: str) -> str | None:
    """``net:<CIDR>``: the /24 (IPv4) or /64 (IPv6) around ``address``; None when it is not one."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    return f"net:{ipaddress.ip_network(f'{parsed}/{NETWORK_PREFIXES[parsed.version]}', strict=False)}"


@dataclass(frozen=True)
class SanctionRules:
    """A route's answer to alarms. ``ladder``: the levels it uses and how long each lasts (seconds);
    ``floors``: per detector, the lowest level its alarm imposes; ``memory``: how long a lapsed
    sanction still counts toward escalation; alarms within ``min_interval`` seconds of the last
    escalation renew the current level instead of raising it. With ``accomplices``, an alarm raised
    across clients also climbs the ladder for the other clients whose queries it matched (a Sybil
    attacker's other keys). It is off by default: a client who can guess another's queries (public
    images, say) could then push that client up the ladder. With ``network``, a block of an address
    client covers its whole network (``network_of``): every user behind the same NAT or carrier
    address range is blocked with it."""

    ladder: Mapping[Level, float] = field(default_factory=lambda: dict(DEFAULT_LADDER))
    floors: Mapping[str, Level] = field(default_factory=dict)
    memory: float = 86400.0
    min_interval: float = 0.0
    accomplices: bool = False
    network: bool = False

    @classmethod
    def parse(cls, ladder: Mapping[str, float] | None = None, floors: Mapping[str, str] | None = None,
              memory: float = 86400.0, min_interval: float = 0.0, accomplices: bool = False,
              network: bool = False) -> SanctionRules:
        """From plain configuration, e.g. ``ladder={"degrade": 600, "block": 3600}``,
        ``floors={"similarity": "degrade"}``."""
        ladder = DEFAULT_LADDER if ladder is None else ladder
        steps = {Level.named(name): float(seconds) for name, seconds in ladder.items()}
        if not steps or Level.NONE in steps:
            raise ValueError("a sanction ladder needs at least one level above 'none'")
        return cls(dict(sorted(steps.items())), {d: Level.named(v) for d, v in (floors or {}).items()},
                   float(memory), float(min_interval), accomplices, network)

    def next_level(self, reached: Level, detector: str, renew: bool) -> Level:
        """The level an alarm from ``detector`` imposes on a client that last reached ``reached``."""
        wanted = max(reached if renew else reached + 1, self.floors.get(detector, Level.NONE))
        return next((level for level in self.ladder if level >= wanted), max(self.ladder))


class MalformedStanding(StoreUnavailable):
    """A stored standing that cannot be read: the guard follows its fail mode, as for a lost store."""


@dataclass(frozen=True)
class Standing:
    """A client's sanction: ``level`` in force until ``until`` (wall-clock seconds); ``reached``
    (the highest level imposed, remembered after it lapses) and ``since`` (its last change)."""

    level: Level
    until: float = 0.0
    reached: Level = Level.NONE
    since: float = 0.0

    def encode(self) -> bytes:
        """The stored record (``guard.sanction_record``)."""
        return sanction_record.encode(self.level, self.until, self.reached, self.since)

    @classmethod
    def decode(cls, raw: bytes | None, now: float) -> Standing:
        """The standing stored as ``raw``; ``MalformedStanding`` when it is not one."""
        if raw is None:
            return NO_STANDING
        try:
            level, until, reached, since = sanction_record.decode(raw)
            return cls(Level(level) if now < until else Level.NONE, until, Level(reached), since)
        except (ValueError, TypeError) as error:  # bad JSON, wrong shape, unknown level
            raise MalformedStanding(f"malformed sanction record: {error}", "malformed") from None


NO_STANDING = Standing(Level.NONE)


class Sanctions:
    """Reads and raises clients' standings in ``store``; ``clock`` is wall time (shared by workers)."""

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time):
        self._store = store
        self._clock = clock

    @staticmethod
    def key(client: str) -> str:
        return f"sanction:{client}"

    async def standing(self, client: str) -> Standing:
        """The client's standing."""
        return self.read(await self._store.get(self.key(client)))

    def read(self, raw: bytes | None) -> Standing:
        """The standing a record read from the store holds; a client without one while the store is
        full of live sanctions is degraded (its sanctions could not be recorded), so no old block is
        forgotten to make room."""
        if raw is None and getattr(self._store, "full", False):
            return Standing(Level.DEGRADE)
        return Standing.decode(raw, self._clock())

    async def escalate(self, client: str, rules: SanctionRules, detector: str) -> tuple[Level, Standing]:
        """Apply an alarm from ``detector`` atomically; returns the level in force before and the new standing."""
        before: list[Level] = []

        def raise_standing(raw: bytes | None) -> bytes:
            now = self._clock()
            try:
                old = Standing.decode(raw, now)
            except MalformedStanding:
                log.error("client %s: malformed sanction record replaced", client)
                old = Standing(Level.NONE)
            before.append(old.level)
            renew = old.level != Level.NONE and rules.min_interval > max(0.0, now - old.since)
            level = rules.next_level(old.reached, detector, renew)
            if level < old.level:  # another route's ladder imposed more; an alarm never lowers it
                return old.encode()
            until = max(now + rules.ladder[level], old.until if old.level == level else 0.0)
            return Standing(level, until, max(level, old.reached), now).encode()

        raw = await self._store.update(self.key(client), raise_standing, ttl=self._ttl(rules))
        new = Standing.decode(raw, self._clock())
        network = network_of(client[3:]) if rules.network and client.startswith("ip:") else None
        if network is not None and new.level == Level.BLOCK:
            await self.cover(network, new)
        if new.level != before[-1]:
            log.warning("client %s sanctioned: %s until %s after an alarm from %s", client, new.level.name.lower(),
                        datetime.fromtimestamp(new.until, timezone.utc).isoformat(timespec="seconds"), detector)
        return before[-1], new

    async def cover(self, network: str, block: Standing) -> None:
        """Block ``network`` until ``block`` lapses (a longer block in force there stays)."""
        def extend(raw: bytes | None) -> bytes:
            try:
                old = Standing.decode(raw, self._clock())
            except MalformedStanding:
                old = NO_STANDING
            if old.level == Level.BLOCK and old.until >= block.until:
                return raw
            return Standing(Level.BLOCK, block.until, Level.BLOCK, block.since).encode()

        await self._store.update(self.key(network), extend, ttl=max(1.0, block.until - self._clock()))
        log.warning("network %s blocked with one of its addresses", network)

    @staticmethod
    def _ttl(rules: SanctionRules) -> float:
        return max(rules.ladder.values()) + rules.memory
