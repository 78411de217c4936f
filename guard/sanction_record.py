"""The stored form of a client's sanction standing, read by the sanctions and by the admission rule
(``guard.ratelimit.admit``): the JSON list ``[level, until, reached, since]`` (levels as integers,
times as wall-clock seconds). The Redis admission script reads the same two leading fields in Lua."""
from __future__ import annotations

import json


def encode(level: int, until: float, reached: int, since: float) -> bytes:
    """The record of a standing."""
    return json.dumps([int(level), until, int(reached), since]).encode()


def decode(raw: bytes) -> tuple[int, float, int, float]:
    """``(level, until, reached, since)`` of a record, the levels as stored (``Level`` checks them);
    ``ValueError`` or ``TypeError`` when ``raw`` is not one."""
    level, until, reached, since = json.loads(raw)
    return level, float(until), reached, float(since)


def level_in_force(raw: bytes | None, now: float) -> int:
    """The level a record puts in force at ``now``: 0 when there is none, it lapsed or it cannot be
    read (its reader decodes it again and fails closed on a malformed one)."""
    if not raw:
        return 0
    try:
        level, until, _, _ = decode(raw)
        return int(level) if until > now else 0
    except (ValueError, TypeError):
        return 0
