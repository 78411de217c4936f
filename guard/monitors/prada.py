"""PRADA: per-client detection of model-extraction query streams (Juuti et al., "PRADA: Protecting
against DNN Model Stealing Attacks", EuroS&P 2019, section IV, Algorithm 1).

For each client and each predicted class ``c`` a growing set ``G_c`` of queries is kept. A new query
of class ``c`` is compared with ``G_c``: its minimum L2 distance ``d_min`` joins the client's set of
distances ``D``, and the query itself joins ``G_c`` when ``d_min`` exceeds the class threshold
``T_c``, which is then raised to ``max(T_c, mean - std)`` of the distances with which members
joined ``G_c`` (the first member joins with distance 0, as in the authors' code). Once ``|D|`` exceeds
``min_distances`` (paper: 100), the Shapiro-Wilk statistic ``W`` of ``D`` (after dropping values
beyond 3 standard deviations) is computed; natural queries give roughly normal distances, synthetic
extraction queries do not, and the client is flagged when ``W < delta``.

Memory is bounded by configuration, and all state lives in the ``StateStore`` (one key per client
and class for ``G_c``, one per client for ``D``), as float32:

- ``G_c`` holds at most ``max_set`` members and at most ``max_set_bytes`` of them (so wide inputs do
  not make a client's state megabytes: 256 members of 150,528 float32 pixels would be 154 MB); at
  the cap it becomes a ring: a new member replaces the
  oldest one, so later queries are compared with the most recent ``max_set`` members (the running
  mean and std of the joining distances, and hence ``T_c``, still cover every member ever admitted).
- ``D`` holds at most ``max_distances`` values (default 5000, the range where SciPy's
  Shapiro-Wilk is exact); at the cap it is the client's most recent window of distances.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from scipy import stats

from guard.monitors.base import Verdict
from guard.store.base import StateStore

# G_c key: dimension, members ever admitted, T_c, sum and sum of squares of joining distances.
_SET_HEADER = struct.Struct("<IQddd")
# D key: distances ever appended.
_DISTANCES_HEADER = struct.Struct("<Q")


@dataclass
class _GrowingSet:
    """One client's ``G_c`` (a ring of at most ``cap`` float32 rows) and its threshold state."""

    members: np.ndarray
    admitted: int = 0
    threshold: float = 0.0
    total: float = 0.0
    total_squares: float = 0.0

    @classmethod
    def decode(cls, raw: bytes | None, dimension: int) -> _GrowingSet:
        if raw is None:
            return cls(np.empty((0, dimension), np.float32))
        stored_dimension, admitted, threshold, total, squares = _SET_HEADER.unpack_from(raw)
        if stored_dimension != dimension:
            raise ValueError(
                f"PRADA state has {stored_dimension} features, the query has {dimension}"
            )
        members = np.frombuffer(raw, np.float32, offset=_SET_HEADER.size).reshape(-1, dimension)
        return cls(members, admitted, threshold, total, squares)

    def encode(self) -> bytes:
        header = _SET_HEADER.pack(
            self.members.shape[1], self.admitted, self.threshold, self.total, self.total_squares
        )
        return header + self.members.tobytes()

    def admit(self, query: np.ndarray, distance: float, cap: int) -> None:
        """Add ``query`` to the set (replacing the oldest member at the cap) and raise ``T_c``."""
        if len(self.members) < cap:
            self.members = np.vstack([self.members, query[None]])
        else:
            if not self.members.flags.writeable:
                self.members = self.members.copy()
            self.members[self.admitted % cap] = query
        self.admitted += 1
        self.total += distance
        self.total_squares += distance * distance
        mean = self.total / self.admitted
        std = np.sqrt(max(self.total_squares / self.admitted - mean * mean, 0.0))
        self.threshold = max(self.threshold, mean - std)

    def observe(self, queries: np.ndarray, cap: int) -> np.ndarray:
        """Algorithm 1's inner step for a class's queries in order: their ``d_min`` (NaN for the
        query that founds an empty set, which adds nothing to ``D``)."""
        minima = np.full(len(queries), np.nan)
        for i, query in enumerate(queries):
            if len(self.members) == 0:
                self.admit(query, 0.0, cap)
                continue
            minima[i] = np.sqrt(np.min(np.sum((self.members - query) ** 2, axis=1)))
            if minima[i] > self.threshold:
                self.admit(query, float(minima[i]), cap)
        return minima


def append_window(raw: bytes | None, values: np.ndarray, cap: int) -> bytes:
    """Append ``values`` to a float32 ring of at most ``cap`` entries (order inside is
    irrelevant)."""
    appended = 0 if raw is None else _DISTANCES_HEADER.unpack_from(raw)[0]
    old = (
        np.empty(0, np.float32)
        if raw is None
        else np.frombuffer(raw, np.float32, offset=_DISTANCES_HEADER.size)
    )
    skipped = max(len(values) - cap, 0)
    values = np.asarray(values, np.float32)[skipped:]
    ring = np.empty(min(appended + skipped + len(values), cap), np.float32)
    ring[: len(old)] = old
    ring[(appended + skipped + np.arange(len(values))) % cap] = values
    return _DISTANCES_HEADER.pack(appended + skipped + len(values)) + ring.tobytes()


def read_window(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, np.float32, offset=_DISTANCES_HEADER.size)


# SciPy's Shapiro-Wilk without its axis/NaN-policy wrapper, which costs as much again as the test
# at n = 5000 and has nothing to do here: the distances are finite and one-dimensional.
_shapiro = getattr(stats.shapiro, "__wrapped__", stats.shapiro)


def shapiro_w(distances: np.ndarray, outlier_sigmas: float = 3.0) -> float:
    """Shapiro-Wilk ``W`` of the distances within ``outlier_sigmas`` standard deviations of their
    mean (Algorithm 1's ``D'``). A point mass (zero spread) is as far from normal as it gets: 0."""
    distances = np.asarray(distances, np.float64)
    centred = distances - distances.mean()
    spread = np.sqrt(centred @ centred / len(distances))
    if spread == 0:
        return 0.0
    kept = distances[np.abs(centred) <= outlier_sigmas * spread]
    if np.ptp(kept) == 0:
        return 0.0
    return float(_shapiro(kept).statistic)


class Prada:
    """PRADA's detector behind the ``Detector`` protocol; ``score`` is ``1 - W`` (0 until ``D``
    holds more than ``min_distances`` values) and the alarm is ``W < delta``."""

    name = "prada"

    def __init__(
        self,
        store: StateStore,
        delta: float = 0.95,
        min_distances: int = 100,
        max_set: int = 256,
        max_distances: int = 5000,
        max_set_bytes: int = 1 << 18,
        outlier_sigmas: float = 3.0,
        ttl: float = 86_400.0,
        prefix: str = "prada",
    ):
        if max_set < 1 or max_distances <= min_distances:
            raise ValueError("need max_set >= 1 and max_distances > min_distances")
        self.store, self.delta, self.min_distances = store, delta, min_distances
        self.max_set, self.max_distances, self.outlier_sigmas = (
            max_set,
            max_distances,
            outlier_sigmas,
        )
        self.ttl, self.prefix, self.max_set_bytes = ttl, prefix, max_set_bytes

    def set_cap(self, dimension: int) -> int:
        """Members a class's set keeps for queries of ``dimension`` float32 values."""
        return max(1, min(self.max_set, self.max_set_bytes // (4 * dimension)))

    async def observe(self, client: str, features: np.ndarray, predicted: np.ndarray) -> Verdict:
        queries = np.asarray(features, np.float32).reshape(len(features), -1)
        labels = np.asarray(predicted).astype(np.int64).reshape(-1)
        minima = np.full(len(queries), np.nan)
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)

            def grow(raw: bytes | None, rows: np.ndarray = rows) -> bytes:
                growing = _GrowingSet.decode(raw, queries.shape[1])
                admitted = growing.admitted
                minima[rows] = growing.observe(queries[rows], self.set_cap(queries.shape[1]))
                return raw if raw is not None and growing.admitted == admitted else growing.encode()

            await self.store.update(f"{self.prefix}:{client}:class:{label}", grow, self.ttl)
        found = minima[~np.isnan(minima)]
        raw = await self.store.update(
            f"{self.prefix}:{client}:distances",
            lambda old: append_window(old, found, self.max_distances),
            self.ttl,
        )
        distances = read_window(raw)
        if len(distances) <= self.min_distances:
            return Verdict(self.name, 0.0, False)
        w = shapiro_w(distances, self.outlier_sigmas)
        return Verdict(self.name, 1.0 - w, w < self.delta)
