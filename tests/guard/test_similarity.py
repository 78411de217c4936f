"""The Blacklight-style similarity detector (Li et al. 2022, section 4): fingerprints, scores,
per-client and cross-client alarms, bounded per-query work, and state shared through a store."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from guard.detectors import Observation, Similarity, SimilarityVerdict, build_detector
from guard.store.memory import MemoryStore


class CountingStore(MemoryStore):
    """A MemoryStore that records the size of every ``swap_many`` call."""

    def __init__(self, **options):
        super().__init__(**options)
        self.swaps: list[int] = []

    async def swap_many(self, table, fields, value, ttl):
        self.swaps.append(len(fields))
        return await super().swap_many(table, fields, value, ttl)


def on_bin_centres(rng, d: int, step: float) -> np.ndarray:
    return (rng.integers(0, 5, (1, d)) + 0.5) * step


def test_fingerprint_is_salted_deterministic_and_quantised(rng):
    detector = Similarity(MemoryStore(), quantization=0.2, window=20, top_n=50, salt="one")
    query = on_bin_centres(rng, 784, 0.2)
    prints = detector.fingerprints(query)[0]
    assert len(prints) == 50 and len(set(prints)) == 50
    assert prints == sorted(prints, reverse=True)
    assert detector.fingerprints(query + rng.uniform(-0.09, 0.09, query.shape))[0] == prints
    other_salt = Similarity(MemoryStore(), quantization=0.2, window=20, top_n=50, salt="two")
    assert not set(other_salt.fingerprints(query)[0]) & set(prints)


def test_batch_fingerprints_match_single_queries_and_count_distinct_windows(rng):
    detector = Similarity(MemoryStore(), quantization=0.2, window=5, stride=3, top_n=100, salt="s")
    batch = rng.uniform(0, 1, (4, 40))
    prints = detector.fingerprints(batch)
    assert prints == [detector.fingerprints(row[None])[0] for row in batch]
    for row, fingerprint in zip(batch, prints):
        levels = np.floor(row / 0.2)
        windows = {tuple(levels[start : start + 5]) for start in range(0, 36, 3)}
        assert len(fingerprint) == len(windows)  # one hash per distinct window, no collisions


def test_short_inputs_and_repeated_windows_give_short_fingerprints():
    detector = Similarity(MemoryStore(), window=20, top_n=50, salt="s")
    assert len(detector.fingerprints(np.zeros((1, 10)))[0]) == 1  # one window: the whole input
    assert len(detector.fingerprints(np.zeros((1, 784)))[0]) == 1  # 765 identical windows


async def test_near_duplicate_alarms_per_client_then_cross_client(rng):
    detector = Similarity(MemoryStore(), threshold=25, salt="s")
    query = on_bin_centres(rng, 784, 0.2)
    first = await detector.observe("alice", query, np.zeros(1))
    assert not first.alarm and first.score == 0
    again = await detector.observe("alice", query + 0.01, np.zeros(1))
    assert isinstance(again, SimilarityVerdict)
    assert (again.alarm, again.scope, again.per_client, again.cross_client) == (
        True,
        "per-client",
        50,
        0,
    )
    sybil = await detector.observe("mallory", query - 0.01, np.zeros(1))
    assert (sybil.alarm, sybil.scope, sybil.per_client, sybil.cross_client) == (
        True,
        "cross-client",
        0,
        50,
    )


class ReplayingStore(MemoryStore):
    """A store whose table swap answers with given earlier query ids, whatever the fields."""

    def __init__(self, earlier):
        super().__init__()
        self.earlier = earlier

    async def swap_many(self, table, fields, value, ttl):
        return (self.earlier + [None] * len(fields))[:len(fields)]


async def test_the_cross_client_score_is_that_of_the_other_clients_most_similar_query(rng):
    """Bob's first query shares 30 hashes with this one, his second 2 (its windows overwrote a few
    of the first's): the cross-client score is 30, whichever of them the table names last."""
    first, second = b"bob" + b"1" * 8, b"bob" + b"2" * 8
    for earlier in ([first] * 30 + [second] * 2, [second] * 2 + [first] * 30, [first, second] * 2 + [first] * 28):
        detector = Similarity(ReplayingStore(earlier), threshold=25, salt="s")
        verdict = await detector.observe("alice", rng.random((1, 784)), np.zeros(1))
        assert (verdict.alarm, verdict.scope, verdict.cross_client, verdict.accomplices) == (
            True, "cross-client", 30, ("bob",))


async def test_verdicts_shared_between_equal_scores_keep_their_own_accomplices(rng):
    """A verdict is built once per pair of scores and shared; a cross-client alarm still names only
    the clients its own query matched, however many alarms with the same scores came before."""
    detector = Similarity(MemoryStore(), threshold=25, salt="s")
    quiet = [await detector.observe(f"c{i}", rng.random((1, 784)), np.zeros(1)) for i in range(3)]
    assert quiet[0] is quiet[1] is quiet[2] and quiet[0].score == 0
    first, second = on_bin_centres(rng, 784, 0.2), on_bin_centres(rng, 784, 0.2)
    await detector.observe("bob", first, np.zeros(1))
    await detector.observe("carol", second, np.zeros(1))
    to_bob = await detector.observe("mallory", first + 0.01, np.zeros(1))
    to_carol = await detector.observe("trudy", second + 0.01, np.zeros(1))
    assert (to_bob.scope, to_bob.cross_client, to_bob.accomplices) == ("cross-client", 50, ("bob",))
    assert (to_carol.scope, to_carol.cross_client, to_carol.accomplices) == ("cross-client", 50, ("carol",))
    assert len(detector._verdicts) <= (detector.top_n + 1) ** 2


async def test_unrelated_queries_share_few_hashes(rng):
    detector = build_detector("similarity", {"threshold": 25, "salt": "s"}, MemoryStore())
    scores = [
        (await detector.observe(f"c{i % 5}", rng.random((1, 784)), np.zeros(1))).score
        for i in range(200)
    ]
    assert max(scores) < 3


async def test_batch_verdict_is_its_most_similar_query(rng):
    detector = Similarity(MemoryStore(), threshold=25, salt="s")
    query = on_bin_centres(rng, 784, 0.2)
    batch = np.vstack([rng.random((2, 784)), query, query + 0.01])
    verdict = await detector.observe("c", batch, np.zeros(4))
    assert verdict.alarm and verdict.score == 50


async def test_a_batch_of_queries_of_two_widths_is_judged_as_one_at_a_time(rng):
    """Two routes with inputs of different widths share a monitor's batch."""
    narrow, wide = on_bin_centres(rng, 40, 0.2), on_bin_centres(rng, 60, 0.2)
    batch = [Observation(client, query + rng.uniform(-0.05, 0.05, query.shape), np.zeros(1))
             for client, query in [("a", narrow), ("b", wide), ("a", narrow), ("b", wide), ("c", narrow)]]
    settings = {"threshold": 10, "window": 5, "top_n": 20, "salt": "s"}
    together, alone = Similarity(MemoryStore(), **settings), Similarity(MemoryStore(), **settings)
    expected = [await alone.observe(o.client, o.features, o.predicted) for o in batch]
    assert await together.observe_batch(batch) == expected
    assert [v.scope for v in expected] == [None, None, "per-client", "per-client", "cross-client"]


async def test_work_per_query_does_not_grow_with_history(rng):
    store = CountingStore(max_table_fields=5_000)
    detector = Similarity(store, top_n=50, salt="s")
    for _ in range(300):
        await detector.observe("c", rng.random((1, 784)), np.zeros(1))
    assert store.swaps == [50] * 300  # one swap of top_n fields per query, whatever came before
    assert len(store._tables["similarity"]) == 5_000  # the table stays bounded


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        Similarity(MemoryStore(), quantization=0)
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("nope", {}, MemoryStore())


@pytest.mark.redis
async def test_two_workers_share_the_table_through_redis(redis_url, rng):
    """Two detector instances (two workers) with one salt see each other's queries via Redis."""
    from guard.store.redis import RedisStore

    prefix = f"test-similarity-{uuid.uuid4().hex}:"
    stores = [RedisStore(redis_url, prefix=prefix) for _ in range(2)]
    workers = [Similarity(store, threshold=25, salt="shared", table="t") for store in stores]
    query = on_bin_centres(rng, 784, 0.2)
    try:
        assert not (await workers[0].observe("a", query, np.zeros(1))).alarm
        verdict = await workers[1].observe("b", query + 0.01, np.zeros(1))  # a near-duplicate
        assert (verdict.alarm, verdict.scope, verdict.cross_client) == (True, "cross-client", 50)
    finally:
        for store in stores:
            await store.close()


async def test_exact_repeats_are_no_evidence_but_near_duplicates_are(rng):
    detector = Similarity(MemoryStore(), salt="s")  # defaults: threshold 25 of top_n 50
    query = on_bin_centres(rng, 784, 0.2)
    # an ordinary client's retry loop, and another client sending the same public input
    retries = [await detector.observe("alice", query, np.zeros(1)) for _ in range(6)]
    assert not any(verdict.alarm for verdict in retries)
    assert not (await detector.observe("bob", query, np.zeros(1))).alarm
    # below float32 resolution it is still the same query the model computes on
    assert not (await detector.observe("alice", query + 1e-12, np.zeros(1))).alarm
    assert (await detector.observe("alice", query + 0.01, np.zeros(1))).alarm


async def test_calibration_on_benign_traffic_with_retries_keeps_retries_quiet(rng):
    from guard.detectors.calibration import calibrate, with_retries

    streams = {f"c{i}": (rng.random((60, 784)).astype(np.float32), np.zeros(60, np.int64)) for i in range(4)}
    retried = with_retries(streams, rate=0.2, repeats=5, seed=0)
    assert all(len(features) > 60 for features, _ in retried.values())
    threshold = (await calibrate(retried, {"similarity": {"salt": "s"}}))["similarity"]["threshold"]
    detector = Similarity(MemoryStore(), threshold=threshold, salt="s")
    query = rng.random((1, 784))
    assert not any([(await detector.observe("alice", query, np.zeros(1))).alarm for _ in range(6)])
