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
  Shapiro-Wilk is exact); at the cap it is the client's most recent window of distances. It is
  stored twice, in arrival order (a ring: which value leaves next) and sorted (what the test
  reads), so a batch never sorts the window.
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats._ansari_swilk_statistics import swilk  # SciPy's Shapiro-Wilk (AS R94): its coefficients

from guard.detectors.base import Detector, Observation, Verdict
from guard.store.base import StateStore

# G_c key: dimension, members ever admitted, T_c, sum and sum of squares of joining distances.
_SET_HEADER = struct.Struct("<IQddd")
# D key: distances ever appended; then the ring and the same values sorted, float32 each.
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
        return b"".join((header, self.members))  # the rows copied once, straight into the value

    def observe(self, queries: np.ndarray, cap: int) -> list[float]:
        """Algorithm 1's inner step for a class's queries in order: their ``d_min`` (NaN for the
        query that founds an empty set, which adds nothing to ``D``). The distances of every query
        to the members before the batch and to the batch's earlier queries come from vectorised
        computations. Which members a query is compared with depends only on how many of the
        batch's queries were admitted before it, and the slots the next admissions take are known
        in advance (appended while the ring holds fewer than ``cap``, else the one at ``admitted %
        cap``): so the nearest member still in the ring is a suffix minimum over the members
        ordered by when they are replaced, and the loop over the queries is arithmetic on Python
        floats. Queries are finite (the middleware refuses others)."""
        n, known = len(queries), len(self.members)
        slots, length = [], known
        for admitted in range(self.admitted, self.admitted + n):
            slots.append(length if length < cap else admitted % cap)
            length += length < cap
        replaced: dict[int, int] = {}  # a member's slot -> the batch's admission (0, 1, ...) replacing it
        for admission, slot in enumerate(slots):
            if slot < known:
                replaced.setdefault(slot, admission)
        # float32 roots: the least root is the root of the least squared distance (roots are monotonic)
        to_members = np.sqrt(squared_distances(queries, self.members))
        if min(replaced.values(), default=n) < n - 1:  # some query comes after a member is replaced
            replacement = np.full(known, n)
            replacement[list(replaced)] = list(replaced.values())
            by_replacement = to_members[:, np.argsort(replacement, kind="stable")]
            # nearest[i][r]: query i's nearest member once the first r of them to be replaced are gone
            nearest = np.minimum.accumulate(by_replacement[:, ::-1], axis=1)[:, ::-1].tolist()
        else:
            nearest = np.minimum.reduce(to_members, axis=1, initial=np.inf)[:, None].tolist()  # ``.min``
        replacing = sorted(replaced.values())
        to_batch = np.sqrt(squared_distances(queries, queries)).tolist() if n > 1 else [[]]
        held: dict[int, int] = {}  # slot -> the batch's query admitted to it, while it is there
        admissions, minima = 0, [math.nan] * n
        for i in range(n):
            if known or held:
                gone = bisect.bisect_left(replacing, admissions)
                distance = nearest[i][gone] if gone < len(nearest[i]) else math.inf
                row = to_batch[i]
                for j in held.values():
                    if row[j] < distance:
                        distance = row[j]
                minima[i] = distance
                if not distance > self.threshold:
                    continue
            else:
                distance = 0.0
            held[slots[admissions]] = i
            admissions += 1
            self.admitted += 1
            self.total += distance
            self.total_squares += distance * distance
            mean = self.total / self.admitted
            std = math.sqrt(max(self.total_squares / self.admitted - mean * mean, 0.0))
            self.threshold = max(self.threshold, mean - std)
        if held:
            members = np.empty((max(known, max(held) + 1), queries.shape[1]), np.float32)
            members[:known] = self.members
            members[list(held)] = queries[list(held.values())]
            self.members = members
        return minima


def squared_distances(queries: np.ndarray, candidates: np.ndarray, budget: int = 1 << 22) -> np.ndarray:
    """``(n, m)`` squared L2 distances between float32 rows, as ``sum((c - q) ** 2)`` per pair (the
    exact float32 arithmetic of comparing one query at a time), in chunks of at most ``budget``
    differences."""
    out = np.empty((len(queries), len(candidates)), np.float32)
    step = max(1, budget // max(1, candidates.size))
    for start in range(0, len(queries), step):
        differences = candidates[None] - queries[start : start + step, None]
        out[start : start + step] = np.add.reduce(np.square(differences, out=differences), axis=2)  # ``.sum``
    return out


def read_window(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A stored ``D``: its ring (arrival order) and its values sorted."""
    stored = np.frombuffer(raw, np.float32, offset=_DISTANCES_HEADER.size)
    if len(stored) % 2:
        raise ValueError("PRADA state: a distance window of odd length")
    return stored[:len(stored) // 2], stored[len(stored) // 2:]


@functools.lru_cache(maxsize=64)
def _shapiro_weights(n: int) -> tuple[np.ndarray, float]:
    """Royston's Shapiro-Wilk coefficients for samples of ``n`` (AS R94; they depend on ``n`` alone)
    laid over the sorted sample, ``-a_i`` for the ``i``-th smallest value, ``a_i`` for the ``i``-th
    largest, 0 for a middle one; and their sum of squares. SciPy's routine computes them, then
    stops at the sample of zero range before testing it."""
    half = np.zeros(n // 2)
    swilk(np.zeros(n), half, False)
    return np.concatenate((-half, np.zeros(n % 2), half[::-1])), 2.0 * float(half.dot(half))


def shapiro_w(distances: np.ndarray, outlier_sigmas: float = 3.0) -> float:
    """Shapiro-Wilk ``W`` of the distances within ``outlier_sigmas`` standard deviations of their
    mean (Algorithm 1's ``D'``). A point mass (zero spread) is as far from normal as it gets: 0."""
    return sorted_shapiro_w(np.sort(np.asarray(distances, np.float64)), outlier_sigmas)


def sorted_shapiro_w(ordered: np.ndarray, outlier_sigmas: float = 3.0) -> float:
    """``shapiro_w`` of distances already sorted (float64): a function of the sorted values only, so
    a window kept sorted as it slides gives the same ``W`` as sorting it afresh. ``W`` is the
    squared correlation of the kept values with their coefficients, ``(sum_i a_i (x_(n+1-i) -
    x_(i)))^2 / sum_i (x_i - mean)^2`` (Shapiro and Wilk 1965; AS R94's statistic, which
    ``scipy.stats.shapiro`` gives to within rounding), in a few vectorised products."""
    n = len(ordered)
    mean = np.add.reduce(ordered) / n  # ``ordered.mean()``, without its wrappers
    centred = ordered - mean
    squares = centred.dot(centred)
    if squares == 0:
        return 0.0
    reach = outlier_sigmas * math.sqrt(squares / n)
    low, high = ordered.searchsorted(mean - reach, "left"), ordered.searchsorted(mean + reach, "right")
    kept = high - low
    if kept < 3 or ordered[high - 1] == ordered[low]:
        return 0.0
    within = centred[low:high]  # D', less the whole window's mean
    weights, weight_squares = _shapiro_weights(kept)
    product, total = weights.dot(within), np.add.reduce(within)
    return float(product * product / (weight_squares * (within.dot(within) - total * total / kept)))


class SortedWindow:
    """``D`` as stored (a ring of at most ``cap`` float32 distances, ``appended`` ever, and its
    values sorted), with room for ``room`` more, so that ``W`` after each of a batch's appended
    distances costs a memmove in place and the test, not a sort of the whole window."""

    def __init__(self, raw: bytes | None, cap: int, room: int = 0):
        self.appended = 0 if raw is None else _DISTANCES_HEADER.unpack_from(raw)[0]
        ring, ordered = (np.empty(0, np.float32),) * 2 if raw is None else read_window(raw)
        if len(ring) > cap:
            raise ValueError(f"PRADA state holds {len(ring)} distances, more than max_distances ({cap})")
        self.size, self.cap = len(ring), cap
        self.ring = np.empty(min(self.size + room, cap), np.float32)
        self.ring[:self.size] = ring
        self._sorted = np.empty(self.size + room)
        self._sorted[:self.size] = ordered

    def encode(self) -> bytes:
        """The window as stored: the count of distances ever appended, the ring, its values sorted."""
        return b"".join((_DISTANCES_HEADER.pack(self.appended), self.ring[:self.size],
                         self._sorted[:self.size].astype(np.float32)))  # one copy of each into the value

    @property
    def ordered(self) -> np.ndarray:
        """The window's values, sorted (float64)."""
        return self._sorted[:self.size]

    def append(self, value: float) -> None:
        value = float(np.float32(value))
        ordered, size = self._sorted, self.size
        at = ordered[:size].searchsorted(value)
        if size == self.cap:  # the ring's oldest value makes way
            slot = self.appended % self.cap
            gone = ordered[:size].searchsorted(float(self.ring[slot]))
            self.ring[slot] = value
            if gone < at:
                ordered[gone:at - 1] = ordered[gone + 1:at]
                at -= 1
            else:
                ordered[at + 1:gone + 1] = ordered[at:gone]
        else:
            self.ring[size] = value
            ordered[at + 1:size + 1] = ordered[at:size]
            self.size += 1
        ordered[at] = value
        self.appended += 1


class Prada(Detector):
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

    async def observe_batch(self, observations: Sequence[Observation]) -> list[Verdict]:
        """Per client: one store update of the class sets it queried (distances of all its queries in
        the batch at once) and of its distances ``D``; then ``W`` after each observation, as if they
        had come one at a time."""
        verdicts: list[Verdict] = [Verdict(self.name, 0.0, False)] * len(observations)
        clients: dict[str, list[int]] = {}
        for index, observation in enumerate(observations):
            clients.setdefault(observation.client, []).append(index)
        for client, indices in clients.items():
            mine = [observations[i] for i in indices]
            for index, verdict in zip(indices, await self._observe_client(client, mine)):
                verdicts[index] = verdict
        return verdicts

    async def _observe_client(self, client: str, observations: list[Observation]) -> list[Verdict]:
        rows = [np.asarray(o.features, np.float32).reshape(len(o.features), -1) for o in observations]
        queries = rows[0] if len(rows) == 1 else np.concatenate(rows)
        rows_of: dict[int, list[int]] = {}
        labels = (int(label) for o in observations for label in np.asarray(o.predicted).reshape(-1).tolist())
        for row, label in enumerate(labels):
            rows_of.setdefault(label, []).append(row)
        classes = sorted(rows_of)
        dimension, cap = queries.shape[1], self.set_cap(queries.shape[1])
        minima = [math.nan] * len(queries)
        verdicts: list[Verdict] = []

        def observe(old: list[bytes | None]) -> list[bytes]:
            """Every class set the client's queries touch, then its distances, as one store update;
            ``W`` after each observation on the way."""
            new = []
            for label, raw in zip(classes, old):
                rows = rows_of[label]
                growing = _GrowingSet.decode(raw, dimension)
                admitted = growing.admitted
                for row, distance in zip(rows, growing.observe(queries[rows], cap)):
                    minima[row] = distance
                new.append(raw if raw is not None and growing.admitted == admitted else growing.encode())
            found = [not math.isnan(distance) for distance in minima]
            distances = iter([distance for distance in minima if not math.isnan(distance)])
            # D after each observation: the window before the batch, slid over the batch's distances.
            window = SortedWindow(old[-1], self.max_distances, room=sum(found))
            verdicts.clear()
            start = 0
            for observation in observations:
                end = start + len(observation.features)
                count = sum(found[start:end])
                for _ in range(count):
                    window.append(next(distances))
                # W changes only with D
                verdicts.append(self._judge(window.ordered) if count or not verdicts else verdicts[-1])
                start = end
            return [*new, window.encode()]

        keys = [f"{self.prefix}:{client}:class:{label}" for label in classes]
        await self.store.update_many([*keys, f"{self.prefix}:{client}:window"], observe, self.ttl)
        return verdicts

    def _judge(self, ordered: np.ndarray) -> Verdict:
        if len(ordered) <= self.min_distances:
            return Verdict(self.name, 0.0, False)
        w = sorted_shapiro_w(ordered, self.outlier_sigmas)
        return Verdict(self.name, 1.0 - w, w < self.delta)
