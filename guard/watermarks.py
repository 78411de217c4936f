"""The watermark defence's records (``guard.outputs.Watermark``): each watermarked or control query
with the client, the time, its features, the label it got (or would have got) and the model's own
label, kept for ``guard verify`` (DAWN, Szyller et al., ACM MM 2021: the owner keeps the watermarked
queries and their answers).

Two places, chosen by the policy's store URI as the state store is: ``MemoryRecords`` (one process,
at most ``max_bytes``, oldest dropped first) and ``RedisRecords`` (a stream per client, capped by
``XADD MAXLEN``, shared by every worker and read by ``guard watermarks export``). Either exports the
records as JSON lines, one record an object, the format ``attacks.ownership.Records.load`` reads.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol
from urllib.parse import urlsplit

import numpy as np

from guard.outputs import Marks
from guard.payload import dumps, loads
from guard.policy import WatermarkRecordsPolicy

WATERMARK, CONTROL = "watermark", "control"


@dataclass(frozen=True)
class Record:
    """One recorded query: ``kind`` (``watermark``: answered with ``label``; ``control``: answered
    truthfully, ``label`` is what a watermark would have been), ``client``, ``time`` (Unix seconds),
    ``features``, ``label`` and ``model_label`` (the model's own top label), as class indices."""

    kind: str
    client: str
    time: float
    features: list[float]
    label: int
    model_label: int

    def encode(self) -> bytes:
        return dumps(asdict(self))

    @classmethod
    def decode(cls, line: bytes) -> Record:
        return cls(**loads(line))


def records_of(marks: Marks, features: np.ndarray, top: Iterable[int], client: str) -> list[Record]:
    """The records a request's ``marks`` make (``top``: the model's labels of its rows)."""
    now, top = time.time(), list(top)
    rows = np.asarray(features, dtype=np.float32).tolist()
    return [Record(WATERMARK if marks.watermarked[i] else CONTROL, client, now, rows[i], int(marks.labels[i]),
                   int(top[i])) for i in np.flatnonzero(marks.watermarked | marks.controls)]


class WatermarkRecords(Protocol):
    async def add(self, records: list[Record]) -> None:
        """Keep ``records`` (dropping the oldest beyond the bound)."""

    async def export(self) -> list[Record]:
        """Every record kept, oldest first per client."""


class MemoryRecords:
    """Records in this process: at most ``max_bytes`` of encoded records, the oldest dropped first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._lines: collections.deque[bytes] = collections.deque()

    async def add(self, records: list[Record]) -> None:
        for record in records:
            line = record.encode()
            self._lines.append(line)
            self.size += len(line)
        while self.size > self.max_bytes:
            self.size -= len(self._lines.popleft())

    async def export(self) -> list[Record]:
        return [Record.decode(line) for line in self._lines]


class RedisRecords:
    """Records in Redis: the stream ``<prefix>watermarks:<client>`` holds one client's, capped at
    ``per_client`` (``XADD MAXLEN``), expiring ``retention`` seconds after its last record."""

    def __init__(self, url: str, per_client: int, retention: float, prefix: str = "predguard:",
                 timeout: float = 0.25) -> None:
        import redis.asyncio as aioredis

        from guard.store.redis import client_options

        self._client = aioredis.Redis.from_url(url, **client_options(timeout))
        self._prefix = f"{prefix}watermarks:"
        self.per_client, self.retention = per_client, retention

    async def add(self, records: list[Record]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for record in records:
                key = self._prefix + record.client
                pipe.xadd(key, {b"r": record.encode()}, maxlen=self.per_client, approximate=False)
                pipe.expire(key, int(self.retention))
            await pipe.execute()

    async def export(self) -> list[Record]:
        records = []
        async for key in self._client.scan_iter(match=self._prefix + "*", count=1000):
            records += [Record.decode(fields[b"r"]) for _, fields in await self._client.xrange(key)]
        return records

    async def close(self) -> None:
        await self._client.aclose()


def records_from_uri(uri: str, bounds: WatermarkRecordsPolicy) -> MemoryRecords | RedisRecords:
    """Where a store URI keeps the records: in this process for ``memory://``, else in Redis."""
    if urlsplit(uri).scheme == "memory":
        return MemoryRecords(bounds.max_bytes)
    return RedisRecords(uri, bounds.per_client, bounds.retention)


def write_lines(records: list[Record], path: str) -> None:
    """Write ``records`` to ``path`` as JSON lines."""
    with open(path, "wb") as out:
        for record in records:
            out.write(record.encode() + b"\n")
