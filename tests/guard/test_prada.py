"""PRADA (Juuti et al. 2019, Algorithm 1): the growing sets, the distance set D, the Shapiro-Wilk
test, the bounds on its state, and that all of it lives in the store."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from scipy import stats

from guard.detectors import Prada, build_detector
from guard.detectors.prada import _SET_HEADER, SortedWindow, _GrowingSet, read_window, shapiro_w
from guard.store.memory import MemoryStore


def test_growing_set_follows_algorithm_1():
    """On a line: the first query founds G_c (joining distance 0), farther queries join while
    d_min > T_c, and T_c becomes max(T_c, mean - std) of the joining distances."""
    growing = _GrowingSet(np.empty((0, 1), np.float32))
    minima = growing.observe(
        np.array([[0.0], [10.0], [20.0], [30.0], [31.0], [30.0]], np.float32), cap=10
    )
    np.testing.assert_allclose(minima, [np.nan, 10, 10, 10, 1, 0])
    np.testing.assert_allclose(growing.members.ravel(), [0, 10, 20, 30])  # 31 and 30 stay out
    joined = np.array([0.0, 10, 10, 10])
    assert growing.threshold == pytest.approx(joined.mean() - joined.std())


def test_classes_have_separate_growing_sets():
    growing = {label: _GrowingSet(np.empty((0, 2), np.float32)) for label in (0, 1)}
    growing[0].observe(np.array([[0.0, 0.0]], np.float32), cap=10)
    growing[1].observe(np.array([[5.0, 5.0]], np.float32), cap=10)
    assert growing[1].observe(np.array([[0.0, 0.0]], np.float32), cap=10)[0] == pytest.approx(
        np.hypot(5, 5)
    )


def slide(raw: bytes | None, values: np.ndarray, cap: int) -> bytes:
    """The stored window ``raw`` with ``values`` appended."""
    window = SortedWindow(raw, cap, room=len(values))
    for value in values:
        window.append(value)
    return window.encode()


def test_distance_window_keeps_the_most_recent_values():
    raw = None
    for chunk in np.split(np.arange(25, dtype=np.float32), [3, 10, 11]):
        raw = slide(raw, chunk, cap=8)
    assert sorted(read_window(raw)[0]) == list(range(17, 25))
    assert sorted(read_window(slide(None, np.arange(20, dtype=np.float32), cap=8))[0]) == list(range(12, 20))
    with pytest.raises(ValueError, match="more than max_distances"):
        SortedWindow(raw, 7)
    with pytest.raises(ValueError, match="odd length"):
        SortedWindow(raw[:-4], 8)


def test_sorted_window_slides_as_its_ring_sorted_afresh(rng):
    """Appended one at a time, in place, and stored between batches, the window is its ring sorted:
    while it grows, once it is full, and with repeated values."""
    values = np.round(rng.random(60), 1).astype(np.float32)  # many ties
    raw = slide(None, values[:5], cap=12)
    for batch in np.split(values[5:], [1, 4, 5, 20, 21, 40]):
        window = SortedWindow(raw, 12, room=len(batch))
        for value in batch:
            window.append(value)
            ring, _ = read_window(window.encode())
            np.testing.assert_array_equal(window.ordered, np.sort(ring.astype(np.float64)))
        raw = window.encode()
        ring, ordered = read_window(raw)
        np.testing.assert_array_equal(ordered, np.sort(ring))  # stored sorted: the next batch does not sort
    assert sorted(read_window(raw)[0]) == sorted(values[-12:])


def test_shapiro_statistic_separates_normal_from_synthetic_distances(rng):
    normal = rng.normal(3.0, 0.5, 400)
    within = normal[np.abs(normal - normal.mean()) <= 3 * normal.std()]
    assert shapiro_w(normal) == pytest.approx(stats.shapiro(within).statistic)
    assert shapiro_w(normal) > 0.99
    assert shapiro_w(np.concatenate([normal, [50.0]])) > 0.99  # beyond 3 sigma: dropped
    assert shapiro_w(np.concatenate([rng.normal(3.0, 0.1, 200), rng.normal(0.4, 0.05, 200)])) < 0.8
    assert shapiro_w(np.full(200, 0.7)) == 0.0


def test_shapiro_statistic_is_scipys(rng):
    """W from the cached coefficients is SciPy's (AS R94) to within rounding, whatever the sample
    size (odd and even, small and up to the 5000 where SciPy is exact) and the distribution."""
    shapes = [lambda n: rng.gamma(rng.uniform(0.5, 8), 1.0, n), lambda n: rng.normal(3.0, 0.5, n),
              lambda n: rng.uniform(0.0, 2.0, n), lambda n: rng.lognormal(0.0, 1.5, n),
              lambda n: np.concatenate([rng.normal(3.0, 0.1, n // 2), rng.normal(0.4, 0.05, n - n // 2)])]
    sizes = [3, 4, 5, 6, 7, 11, 12, 20, 21, 99, 100, 101, 1000, 2047, 4998, 4999, 5000]
    for n in sizes + list(rng.integers(3, 5001, 40)):
        for shape in shapes:
            distances = shape(n).astype(np.float32).astype(np.float64)  # as stored
            ordered = np.sort(distances)
            within = ordered[np.abs(ordered - distances.mean()) <= 3 * distances.std()]
            if len(within) >= 3 and within[-1] > within[0]:
                assert shapiro_w(distances) == pytest.approx(stats.shapiro(within).statistic, rel=1e-12, abs=0)


def test_shapiro_statistic_by_hand():
    """Three values: Royston's coefficients are -/+ 1/sqrt(2), so W = (x3 - x1)^2 / (2 SS): 1 for
    equal gaps, 3/4 (its least) for two equal values; and W does not move with shift or scale."""
    assert shapiro_w(np.array([2.0, 0.0, 1.0])) == pytest.approx(1.0, rel=1e-12)
    assert shapiro_w(np.array([0.0, 0.0, 1.0])) == pytest.approx(0.75, rel=1e-12)
    sample = np.array([0.5, 1.0, 1.2, 1.3, 2.0, 4.0])
    assert shapiro_w(7.0 + 3.0 * sample) == pytest.approx(shapiro_w(sample), rel=1e-12)


async def test_no_verdict_until_more_than_min_distances(rng):
    prada = Prada(MemoryStore(), delta=1.0, min_distances=100)  # delta 1: any test result alarms
    first = await prada.observe("c", rng.random((101, 5)), np.zeros(101))  # 100 distances: too few
    assert (first.score, first.alarm) == (0.0, False)
    second = await prada.observe("c", rng.random((1, 5)), np.zeros(1))
    assert second.alarm and second.score > 0


async def test_batches_and_single_queries_reach_the_same_state(rng):
    queries, labels = rng.random((300, 6)), rng.integers(0, 3, 300)
    batched, single = Prada(MemoryStore()), Prada(MemoryStore())
    for start in range(0, 300, 50):
        batch_verdict = await batched.observe(
            "c", queries[start : start + 50], labels[start : start + 50]
        )
    for query, label in zip(queries, labels):
        single_verdict = await single.observe("c", query[None], label[None])
    assert batch_verdict == single_verdict
    for key in ["prada:c:class:0", "prada:c:class:2", "prada:c:window"]:
        assert await batched.store.get(key) == await single.store.get(key)


@pytest.mark.parametrize("cap", [1, 3, 16])
def test_a_batch_admitting_more_than_the_ring_holds_matches_single_queries(cap, rng):
    """Admissions within one batch replace the oldest members, the batch's own included: the
    batch's distances and the set it leaves are those of its queries one at a time."""
    queries = rng.normal(0, 1, (40, 3)).astype(np.float32) * np.linspace(1, 20, 40, dtype=np.float32)[:, None]
    batched, single = _GrowingSet(np.empty((0, 3), np.float32)), _GrowingSet(np.empty((0, 3), np.float32))
    batched.observe(queries[:7], cap)
    single.observe(queries[:7], cap)
    minima = batched.observe(queries[7:], cap)
    one_by_one = np.concatenate([single.observe(query[None], cap) for query in queries[7:]])
    np.testing.assert_array_equal(minima, one_by_one)
    assert batched.encode() == single.encode() and batched.admitted > 7 + cap


async def test_state_is_per_client_and_bounded(rng):
    store = MemoryStore()
    prada = build_detector("prada", {"max_set": 16, "max_distances": 150}, store)
    await prada.observe("a", rng.random((400, 10)), rng.integers(0, 2, 400))
    for label in (0, 1):
        assert len(await store.get(f"prada:a:class:{label}")) == _SET_HEADER.size + 16 * 10 * 4
    assert len(read_window(await store.get("prada:a:window"))[0]) == 150
    assert await store.get("prada:b:window") is None
    later = await prada.observe("b", rng.random((1, 10)), np.zeros(1))
    assert later.score == 0.0  # client b has no history of its own


async def test_growing_set_ring_replaces_the_oldest_member():
    growing = _GrowingSet(np.empty((0, 1), np.float32))
    growing.observe(np.array([[0.0], [100.0], [300.0], [700.0]], np.float32), cap=3)
    assert sorted(growing.members.ravel()) == [100.0, 300.0, 700.0]
    assert growing.admitted == 4


def test_rejects_mismatched_dimensions():
    state = _GrowingSet(np.zeros((1, 3), np.float32)).encode()
    with pytest.raises(ValueError, match="3 features"):
        _GrowingSet.decode(state, 4)


@pytest.mark.redis
async def test_redis_store_gives_the_same_verdicts(redis_url, rng):
    """PRADA keeps all its state in the store: over Redis it judges exactly as in memory."""
    from guard.store.redis import RedisStore

    queries, labels = rng.random((150, 16)), rng.integers(0, 3, 150)
    redis = RedisStore(redis_url, prefix=f"test-prada-{uuid.uuid4().hex}:")
    shared, local = Prada(redis), Prada(MemoryStore())
    try:
        for start in range(0, 150, 10):
            batch = slice(start, start + 10)
            assert await shared.observe("c", queries[batch], labels[batch]) == await local.observe(
                "c", queries[batch], labels[batch]
            )
    finally:
        await redis.close()


async def test_wide_queries_are_capped_in_bytes_not_only_in_members(rng):
    store = MemoryStore()
    prada = Prada(store, max_set=256, max_set_bytes=64 * 1024)
    wide = rng.random((40, 4096)).astype(np.float32)  # 16 KiB a query
    await prada.observe("c", wide, np.zeros(40))
    stored = await store.get("prada:c:class:0")
    assert prada.set_cap(4096) == 4 and len(stored) <= 64 * 1024 + 64
