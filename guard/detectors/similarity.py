"""A history-independent similarity detector in the spirit of Blacklight (Li et al., "Blacklight:
Scalable Defense for Neural Networks against Query-Based Black-Box Attacks", USENIX Security 2022,
section 4).

Each query is quantised (``floor(x / quantization)``), flattened, and cut into windows of
``window`` values with stride ``stride``; each distinct window is hashed with a keyed hash and
the ``top_n`` largest hashes form the query's fingerprint. One bounded hash table in the store maps
hash -> id of the last query that produced it; the id carries the client, so a single table serves
both the per-client view and the cross-client view (queries spread over many API keys, a Sybil
attack). The score of a query is the number of its hashes shared with the most similar earlier
query, and the alarm is ``score >= threshold``. An exact repeat (the same values at the model's
float32 precision) is no evidence: it gets the identical answer and teaches nothing new, so an
ordinary client's retries never alarm. The id of a query is its client and a keyed digest of its
float32 values, and matches with the same digest are left out of the score. The per-query cost is
one fingerprint and ``top_n`` swapped fields (a batch of queries: one ``swap_many`` for all),
independent of how many queries came before.

The hash: Blacklight uses SHA-256 of each window. What the detector needs from it is only that
distinct windows rarely collide and that clients cannot predict the hashes (and so cannot aim
for the top ``top_n``). A salted strongly universal hash gives both, and all windows of a batch
are hashed in one vectorised product instead of one SHA-256 call per window: the vector
multiply-shift of Thorup ("High Speed Hashing for Integers and Strings", arXiv:1504.06804,
section 3), ``h(x) = ((a_0 + sum_i a_{i+1} x_i) mod 2**64) >> 32`` over the 32-bit quantised
levels ``x_i`` with 64-bit keys ``a_i``, twice with independent keys for a 64-bit fingerprint (two
distinct windows collide with probability ``2**-64``). The keys are derived from the salt
(SHAKE-256), so they are unpredictable to clients; workers that share a store must share the salt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from itertools import accumulate, chain, repeat
from dataclasses import dataclass, replace

import numpy as np

from guard.detectors.base import Detector, Observation, Verdict
from guard.store.base import StateStore

_QUERY_ID_BYTES = 8
_HIGH_HALF = np.uint64(0xFFFFFFFF00000000)
_LOW_HALF = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SimilarityVerdict(Verdict):
    """A ``Verdict`` that also says how similar the most similar earlier query of the same client
    (``per_client``) and of any other client (``cross_client``) was, and which of them fired."""

    per_client: float = 0.0
    cross_client: float = 0.0
    scope: str | None = None


class Similarity(Detector):
    """Blacklight-style detector behind the ``Detector`` protocol (defaults follow Blacklight's
    settings for 784-pixel MNIST-like inputs in [0, 1])."""

    name = "similarity"

    def __init__(
        self,
        store: StateStore,
        threshold: float = 25,
        quantization: float = 0.2,
        window: int = 20,
        stride: int = 1,
        top_n: int = 50,
        salt: bytes | str | None = None,
        ttl: float = 86_400.0,
        table: str = "similarity",
    ):
        if quantization <= 0 or window < 1 or stride < 1 or top_n < 1:
            raise ValueError("quantization must be > 0 and window, stride, top_n >= 1")
        self.store, self.threshold, self.quantization = store, threshold, quantization
        self.window, self.stride, self.top_n, self.ttl, self.table = (
            window,
            stride,
            top_n,
            ttl,
            table,
        )
        salt = os.urandom(16) if salt is None else salt
        salt = salt.encode() if isinstance(salt, str) else salt
        # Row 0: the two additive keys a_0; rows 1..window: the multipliers of each position.
        stream = hashlib.shake_256(b"predguard similarity keys" + salt).digest(16 * (window + 1))
        self._keys = np.frombuffer(stream, "<u8").reshape(window + 1, 2)
        self._digest_key = hashlib.shake_256(b"predguard similarity query ids" + salt).digest(32)
        self._verdicts: dict[tuple[int, int], SimilarityVerdict] = {}

    def digests(self, queries: np.ndarray) -> list[bytes]:
        """Per query (a row of ``queries``), a keyed digest of its values at float32 (exact repeats
        share it); a query's id is its client's name and this digest."""
        # At float32, -0.0 made 0.0 (equal values, one digest); the sum is a new C-contiguous array.
        rows = np.asarray(queries, np.float32).reshape(len(queries), -1) + np.float32(0)
        packed, width = memoryview(rows.tobytes()), rows.shape[1] * rows.itemsize
        return [hashlib.blake2b(packed[row * width:(row + 1) * width], key=self._digest_key,
                                digest_size=_QUERY_ID_BYTES).digest() for row in range(len(rows))]

    def fingerprints(self, queries: np.ndarray) -> list[list[bytes]]:
        """Per query (a row of ``queries``), the ``top_n`` largest keyed hashes of its distinct
        windows, as 8 big-endian bytes each, largest first."""
        rows = np.asarray(queries, np.float64).reshape(len(queries), -1)
        levels = np.floor(rows / self.quantization).astype(np.int64).view(np.uint64) & _LOW_HALF
        (n, length), (row_step, step) = levels.shape, levels.strides
        width = min(self.window, length)
        windows = np.ndarray((n, (length - width) // self.stride + 1, width), levels.dtype, levels,
                             strides=(row_step, step * self.stride, step))  # a view: as_strided, cheaper
        sums = windows @ self._keys[1 : width + 1] + self._keys[0]
        hashes = (sums[..., 0] & _HIGH_HALF) | (sums[..., 1] >> np.uint64(32))
        hashes.sort(axis=1)  # in place: a new array
        # Per row, largest first: the first of each run of equal hashes is a distinct one.
        hashes = hashes[:, ::-1]
        distinct = np.empty(hashes.shape, bool)
        distinct[:, 0] = True
        np.not_equal(hashes[:, 1:], hashes[:, :-1], out=distinct[:, 1:])
        if hashes.shape[1] > self.top_n:  # else every distinct hash is among the top_n
            distinct &= distinct.cumsum(axis=1) <= self.top_n
        elif distinct.all():  # the usual case: every window distinct, every row's hashes kept
            return hashes.astype(">u8").view("V8").tolist()
        fields = hashes[distinct].astype(">u8").view("V8").tolist()  # bytes, row after row
        ends = list(accumulate(distinct.sum(axis=1).tolist()))
        return [fields[start:end] for start, end in zip([0, *ends], ends)]

    async def observe_batch(self, observations: Sequence[Observation]) -> list[Verdict]:
        """Judge each query in order (one fingerprinting of the batch's queries of each width and
        one ``swap_many`` of all their hashes); an observation's verdict is that of its most
        similar query."""
        if not observations:
            return []
        queries = [np.asarray(o.features).reshape(len(o.features), -1) for o in observations]
        prints, digests = self._signatures(queries)
        owners, counts = [o.client.encode() for o in observations], list(map(len, queries))
        ids = list(map(bytes.__add__, chain.from_iterable(map(repeat, owners, counts)), digests))
        sizes = list(map(len, prints))
        earlier = await self.store.swap_many(self.table, list(chain.from_iterable(prints)),
                                             list(chain.from_iterable(map(repeat, ids, sizes))), self.ttl)
        ends = list(accumulate(sizes))
        starts = [0, *ends]
        verdicts, row = [], 0
        for owner, count in zip(owners, counts):
            best_own, best_others, best = 0, 0, 0
            accomplices: set[bytes] = set()
            for digest, start, end in zip(digests[row:row + count], starts[row:row + count], ends[row:row + count]):
                own, others = self._scores(owner, digest, earlier[start:end])
                accomplices.update(other for other, n in others.items() if n >= self.threshold)
                most = max(others.values(), default=0)
                if max(own, most) > best:
                    best_own, best_others, best = own, most, max(own, most)
            row += count
            verdict = self._judge(best_own, best_others)
            if verdict.scope == "cross-client":
                verdict = replace(verdict, accomplices=tuple(sorted(other.decode() for other in accomplices)))
            verdicts.append(verdict)
        return verdicts

    @staticmethod
    def _scores(owner: bytes, digest: bytes, earlier: list[bytes | None]) -> tuple[int, dict[bytes, int]]:
        """From the ids of the queries that last produced a query's hashes (None: a hash seen first),
        the most hashes shared with one of ``owner``'s earlier queries and, per other client, with
        one of its; exact repeats (the query's own ``digest``) left out."""
        matches: dict[bytes, int] = {}
        for match in earlier:
            if match is not None:
                matches[match] = matches.get(match, 0) + 1
        own, others = 0, {}
        for match, n in matches.items():
            if match[-_QUERY_ID_BYTES:] == digest:
                continue
            client = match[:-_QUERY_ID_BYTES]
            if client == owner:
                own = max(own, n)
            else:
                others[client] = max(others.get(client, 0), n)
        return own, others

    def _signatures(self, queries: list[np.ndarray]) -> tuple[list[list[bytes]], list[bytes]]:
        """``fingerprints`` and ``digests`` of every row of ``queries`` in order, computed once per
        row width."""
        widths: dict[int, list[int]] = {}
        for i, rows in enumerate(queries):
            widths.setdefault(rows.shape[1], []).append(i)
        if len(widths) == 1:  # the usual batch: one width, signed in order
            rows = queries[0] if len(queries) == 1 else np.concatenate(queries)
            return self.fingerprints(rows), self.digests(rows)
        found: list[list[tuple[list[bytes], bytes]]] = [[] for _ in queries]
        for indices in widths.values():
            rows = np.concatenate([queries[i] for i in indices])
            signed = zip(self.fingerprints(rows), self.digests(rows))
            for i in indices:
                found[i] = [next(signed) for _ in range(len(queries[i]))]
        signed = list(chain.from_iterable(found))
        return [fingerprint for fingerprint, _ in signed], [digest for _, digest in signed]

    def _judge(self, per_client: int, cross_client: int) -> SimilarityVerdict:
        """The verdict for these scores, built once per pair (verdicts are immutable; scores are at
        most ``top_n``, so at most ``(top_n + 1) ** 2`` of them are kept)."""
        verdict = self._verdicts.get((per_client, cross_client))
        if verdict is None:
            scope = ("per-client" if per_client >= self.threshold
                     else "cross-client" if cross_client >= self.threshold else None)
            verdict = self._verdicts[per_client, cross_client] = SimilarityVerdict(
                self.name, float(max(per_client, cross_client)), scope is not None,
                per_client=float(per_client), cross_client=float(cross_client), scope=scope)
        return verdict
