"""State stores behind one protocol (``guard.store.base.StateStore``), chosen by a URI as the
``limits`` library chooses its storages: ``memory://`` (default, one process, bounded) or
``redis://host:port/db`` / ``rediss://...`` (shared by all workers and replicas)."""
from __future__ import annotations

from urllib.parse import urlsplit

from guard.store.base import StateStore, StoreUnavailable
from guard.store.memory import MemoryStore

__all__ = ["MemoryStore", "StateStore", "StoreUnavailable", "is_shared", "memory_options", "store_from_uri"]


def store_from_uri(uri: str = "memory://", **options) -> StateStore:
    """The store a URI names; ``options`` go to its constructor (e.g. ``max_keys`` for memory,
    ``prefix`` or ``timeout`` for Redis)."""
    scheme = urlsplit(uri).scheme
    if scheme == "memory":
        return MemoryStore(**options)
    if scheme in ("redis", "rediss", "unix"):
        from guard.store.redis import RedisStore

        return RedisStore(uri, **options)
    raise ValueError(f"unknown state store URI {uri!r}: use memory:// or redis://host:port/db")


def is_shared(uri: str) -> bool:
    """Whether other processes may read and write the store a URI names (Redis), or only this one."""
    return urlsplit(uri).scheme != "memory"


def memory_options(uri: str, **options) -> dict:
    """``options`` for an in-process store's constructor; none for Redis (bounded by its maxmemory)."""
    return {} if is_shared(uri) else options
