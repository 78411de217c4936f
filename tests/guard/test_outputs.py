"""Output defences: distributions out, top label kept, rounding bounded, keyed noise deterministic."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from guard.outputs import LabelOnly, Noise, Pipeline, ReverseSigmoid, Round, TopK, parse

SECRET = b"test secret, 16+ bytes"

# Rows mixing arbitrary values with a few repeated ones, so exact ties at the top are common.
entries = st.one_of(st.floats(0, 1, allow_subnormal=False), st.sampled_from([0.0, 0.1, 0.25, 0.5]))


@st.composite
def distributions(draw) -> np.ndarray:
    n, k = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    raw = draw(arrays(np.float64, (n, k), elements=entries))
    raw[:, 0] += raw.sum(axis=1) == 0  # every row needs some mass
    return raw / raw.sum(axis=1, keepdims=True)


def features_for(p: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((len(p), 4))


defences = st.one_of(
    st.integers(0, 6).map(Round),
    st.integers(1, 12).map(TopK),
    st.just(LabelOnly()),
    st.floats(0.01, 3).map(lambda s: Noise(s, SECRET)),
    st.tuples(st.floats(0.01, 2), st.floats(0.05, 20)).map(lambda bg: ReverseSigmoid(*bg)),
)


@settings(max_examples=150, deadline=None)
@given(distributions(), defences)
def test_every_defence_returns_distributions_with_the_same_top_label(p, defence):
    q = defence(p, features_for(p))
    assert q.shape == p.shape
    assert np.isfinite(q).all() and (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))


@settings(max_examples=150, deadline=None)
@given(distributions(), st.integers(0, 6))
def test_round_lands_on_the_grid_and_its_error_is_bounded(p, decimals):
    q = Round(decimals)(p)
    units = q * 10**decimals
    np.testing.assert_allclose(units, np.rint(units), atol=1e-6)
    np.testing.assert_array_equal(np.rint(units).sum(axis=1), 10**decimals)
    error = np.abs(q - p)
    assert (error < 2 * 10.0**-decimals + 1e-12).all()
    # Within one unit wherever the top leads by two units, so no tie at the top can need breaking.
    ordered = np.sort(p, axis=1)
    clear = ordered[:, -1] - (ordered[:, -2] if p.shape[1] > 1 else 0) >= 2 * 10.0**-decimals
    assert (error[clear] < 10.0**-decimals + 1e-12).all()


def test_round_repairs_sums_and_breaks_ties_towards_the_top_label():
    q = Round(2)(np.array([[0.333, 0.333, 0.334], [0.125, 0.125, 0.75], [0.004, 0.004, 0.992]]))
    np.testing.assert_allclose(q, [[0.33, 0.33, 0.34], [0.13, 0.12, 0.75], [0.01, 0.0, 0.99]])
    # Ten near-equal classes at one decimal: plain rounding ties them all; the top label must stay on top.
    p = np.full((1, 10), 0.0999999)
    p[0, 3] = 1 - p[0, :3].sum() - p[0, 4:].sum()
    q = Round(1)(p)
    assert q.argmax() == 3 and q[0, 3] == pytest.approx(0.2) and q.sum() == pytest.approx(1.0)
    # In a batch, only the rows whose top label needs the repair get it: each row as if alone.
    batch = np.vstack([np.full((1, 10), 0.1), p, [[0.05] * 9 + [0.55]], p[:, ::-1]])
    np.testing.assert_array_equal(Round(1)(batch), np.vstack([Round(1)(row[None]) for row in batch]))
    assert (Round(1)(batch).argmax(axis=1) == batch.argmax(axis=1)).all()
    # The rows as lists (as the middleware hands them) give the same rows back as lists.
    assert Round(1)(batch.tolist()) == Round(1)(batch).tolist()


@settings(max_examples=100, deadline=None)
@given(distributions(), st.integers(1, 12))
def test_top_k_keeps_at_most_k_classes_in_proportion(p, k):
    q = TopK(k)(p)
    assert ((q > 0).sum(axis=1) <= k).all()
    kept = q > 0
    ratio = np.where(kept, q / np.where(kept, p, 1), np.nan)
    spread = np.nanmax(ratio, axis=1) - np.nanmin(ratio, axis=1)
    assert (spread < 1e-6 * np.nanmax(ratio, axis=1)).all()


@given(distributions())
def test_label_only_is_one_hot_on_the_top_label(p):
    q = LabelOnly()(p)
    np.testing.assert_array_equal(q, np.eye(p.shape[1])[p.argmax(axis=1)])


def test_noise_is_a_function_of_the_query_and_the_secret():
    p = np.tile([0.6, 0.3, 0.1], (3, 1))
    x = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    noise = Noise(0.5, SECRET)
    q = noise(p, x)
    np.testing.assert_array_equal(q, noise(p, x.copy()))  # repeated queries: identical answers
    np.testing.assert_array_equal(q[0], q[2])  # the same row, wherever it sits in a batch
    np.testing.assert_array_equal(q[1:2], noise(p[1:2], x[1:2]))
    assert not np.allclose(q[0], q[1])  # different queries: different noise
    assert not np.allclose(q, p, atol=1e-3)  # it perturbs
    assert not np.allclose(q, Noise(0.5, b"another secret!!")(p, x))
    np.testing.assert_array_equal(noise(p[:1], [[-0.0, 2]]), noise(p[:1], [[0.0, 2]]))


def test_noise_spreads_with_its_scale_and_repeats_average_nothing():
    p = np.tile([0.5, 0.3, 0.2], (400, 1))
    x = np.random.default_rng(1).random((400, 3))
    small, large = (np.abs(Noise(s, SECRET)(p, x) - p).mean() for s in (0.05, 0.5))
    assert 0 < small < large
    repeats = np.stack([Noise(0.5, SECRET)(p[:1], x[:1]) for _ in range(50)])
    assert np.ptp(repeats, axis=0).max() == 0.0


def test_noise_needs_features_and_a_secret():
    with pytest.raises(ValueError, match="feature row"):
        Noise(0.1, SECRET)(np.array([[0.5, 0.5]]), None)
    with pytest.raises(ValueError, match="secret"):
        Noise(0.1, b"")


def test_reverse_sigmoid_follows_lee_et_al():
    p = np.array([[0.7, 0.2, 0.1]])
    beta, gamma = 0.3, 2.0
    sigmoid = 1 / (1 + np.exp(-gamma * np.log(p / (1 - p))))
    expected = p - beta * (sigmoid - 0.5)
    np.testing.assert_allclose(ReverseSigmoid(beta, gamma)(p), expected / expected.sum())
    # At probability 1/2 the perturbation vanishes; certain zeros receive beta / 2 before renormalising.
    np.testing.assert_allclose(ReverseSigmoid(0.4, 1.0)(np.array([[0.5, 0.5, 0.0]])), [[0.5, 0.5, 0.2]] / np.float64(1.2))


@pytest.mark.parametrize("spec, expected", [
    ("round:2", Round(2)), ("top_k:3", TopK(3)), ("label_only", LabelOnly()),
    ("noise:0.25", Noise(0.25, SECRET)), ("reverse_sigmoid:0.5:2", ReverseSigmoid(0.5, 2.0)),
])
def test_parse_builds_the_named_defence(spec, expected):
    assert parse(spec, SECRET) == expected


@pytest.mark.parametrize("spec, message", [
    ("blur:2", "unknown output spec"), ("round", "takes 1 argument"), ("round:two", "not a valid int"),
    ("round:13", "between 0 and 12"), ("top_k:0", "at least 1"), ("noise:-1", "positive"),
    ("reverse_sigmoid:0.5", "takes 2 argument"), ("reverse_sigmoid:0:1", "beta must be"),
    ("label_only:1", "takes 0 argument"), ("noise:nan", "positive"),
])
def test_parse_rejects_bad_specs_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec, SECRET)


def test_noise_spec_needs_the_server_secret():
    with pytest.raises(ValueError, match="secret"):
        parse("noise:0.1")


def test_pipeline_applies_in_order_and_label_only_goes_last():
    p = np.array([[0.55, 0.3, 0.15]])
    pipeline = Pipeline.from_specs(["top_k:2", "round:1"])
    np.testing.assert_allclose(pipeline(p), [[0.6, 0.4, 0.0]])
    assert not pipeline.label_only and Pipeline.from_specs(["round:1", "label_only"]).label_only
    np.testing.assert_array_equal(Pipeline()(p), p)
    with pytest.raises(ValueError, match="last"):
        Pipeline.from_specs(["label_only", "round:2"])
