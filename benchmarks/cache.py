"""Work done once: trained models and finished outcomes on disk under a content hash.

Targets, DP targets, reference models and attack outcomes are pure functions of (data, recipe,
seed), so each is stored under the SHA-256 of a canonical encoding of what it depends on. Models are
pickled with ``torch.save``; outcomes are JSON. Writes are atomic (a temporary file renamed), and a
file lock lets processes sharing the folder make each entry once.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
FORMAT = 1
"""Bumped when what an entry holds for the same key changes (keys then change with it)."""


def default_root() -> Path:
    """The user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``) / predguard / bench."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "predguard" / "bench"


def _canonical(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {"array": hashlib.sha256(data.tobytes()).hexdigest(), "dtype": str(data.dtype),
                "shape": list(data.shape)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": type(value).__name__, **_canonical(dataclasses.asdict(value))}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot key the cache on a {type(value).__name__}")


def digest(*parts: Any) -> str:
    """The content hash of ``parts`` (JSON-like values, dataclasses and numpy arrays)."""
    encoded = json.dumps(_canonical([FORMAT, *parts]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


class Cache:
    """Entries under ``root``: ``models/<hash>.pt`` and ``outcomes/<hash>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def outcome(self, key: str) -> Any | None:
        """The stored JSON outcome under ``key``, or None."""
        path = self._path("outcomes", key, ".json")
        return json.loads(path.read_text()) if path.exists() else None

    def store(self, key: str, outcome: Any) -> None:
        """Store the JSON ``outcome`` under ``key``."""
        self._write(self._path("outcomes", key, ".json"), json.dumps(outcome).encode())

    def outcome_or(self, key: str, make: Callable[[], T]) -> T:
        """The stored outcome under ``key``, else ``make()`` stored."""
        return self._once(self._path("outcomes", key, ".json"), make, lambda p: json.loads(p.read_text()),
                          lambda value: json.dumps(value).encode())

    def model(self, key: str, make: Callable[[], T]) -> T:
        """The stored model (any ``torch.save``-able object) under ``key``, else ``make()`` stored."""
        import io

        import torch

        def encode(value: T) -> bytes:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            return buffer.getvalue()
        return self._once(self._path("models", key, ".pt"), make,
                          lambda p: torch.load(p, weights_only=False), encode)

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / key[:2] / f"{key}{suffix}"

    def _once(self, path: Path, make: Callable[[], T], read: Callable[[Path], T],
              encode: Callable[[T], bytes]) -> T:
        if path.exists():
            return read(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be making it: wait for it
            if path.exists():
                return read(path)
            value = make()
            self._write(path, encode(value))
            return value

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
