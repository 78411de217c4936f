"""The detectors on digits traffic: synthetic extraction streams (Jacobian augmentation, line
search) are flagged within a few hundred queries, held-out benign clients stay within the calibrated
false-positive rate over 10,000 queries, and the same attack spread over 20 API keys is caught
across clients by the similarity detector while per-client PRADA misses it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guard import models
from benchmarks.perf.detectors import DIGITS_SIMILARITY, first_alarm
from benchmarks.traffic import benign_streams, jacobian_stream, line_search_stream, spread
from guard.detectors import build_detector
from guard.detectors.calibration import calibrate, interleave
from guard.store.memory import MemoryStore

FPR = 0.001


@pytest.fixture(scope="module")
def oracle(digits_mlp):
    return lambda X: models.predict_proba(digits_mlp, X).argmax(axis=1)


@pytest.fixture(scope="module")
def attacks(digits, digits_split, oracle) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Attacker streams built from the auxiliary part of digits (never calibrated or tested on)."""
    aux = digits.X[digits_split.aux].astype(np.float32)
    rng = np.random.default_rng(1)
    starts, ends = aux[rng.integers(len(aux), size=40)], aux[rng.integers(len(aux), size=40)]
    return {
        "jacobian": jacobian_stream(oracle, aux[:50], digits.n_classes, rounds=3),
        "line-search": line_search_stream(oracle, starts, ends),
    }


@pytest.fixture(scope="module")
def thresholds(digits, digits_split, oracle) -> dict[str, dict[str, float]]:
    """Calibrated on 20 clients x 500 natural variations of the target-train part of digits."""
    benign = benign_streams(
        oracle,
        digits.X[digits_split.train],
        digits.image_shape,
        20,
        500,
        seed=1,
        prefix="calibration",
    )
    return asyncio.run(calibrate(benign, {"prada": {}, "similarity": DIGITS_SIMILARITY}, fpr=FPR))


def detectors(thresholds) -> dict:
    store = MemoryStore()
    return {
        "prada": build_detector("prada", thresholds["prada"], store),
        "similarity": build_detector(
            "similarity", {**DIGITS_SIMILARITY, **thresholds["similarity"]}, store
        ),
    }


@pytest.mark.parametrize("attack", ["jacobian", "line-search"])
@pytest.mark.parametrize("name", ["prada", "similarity"])
async def test_extraction_stream_is_flagged_within_a_few_hundred_queries(
    attacks, thresholds, attack, name
):
    delay = await first_alarm(detectors(thresholds)[name], {"attacker": attacks[attack]})
    assert delay is not None and delay <= 300, f"{name} on {attack}: first alarm after {delay}"


async def test_benign_clients_stay_within_the_calibrated_rate(
    digits, digits_split, oracle, thresholds
):
    """20 other clients x 500 variations of the held-out test part: 10,000 queries."""
    benign = benign_streams(
        oracle, digits.X[digits_split.test], digits.image_shape, 20, 500, seed=2, prefix="held-out"
    )
    judges = detectors(thresholds)
    alarms = {name: [] for name in judges}
    for client, features, labels in interleave(benign):
        for name, detector in judges.items():
            if (await detector.observe(client, features, labels)).alarm:
                alarms[name].append(client)
    assert sum(len(features) for features, _ in benign.values()) >= 10_000
    # Calibrated at 0.1% on other data: queries (similarity) and clients (PRADA) may exceed the
    # target only by sampling error; see the report for the counts measured.
    assert len(alarms["similarity"]) <= 3 * FPR * 10_000
    assert len(set(alarms["prada"])) <= 2


async def test_sybil_attack_is_caught_across_clients_but_not_by_prada(attacks, thresholds):
    sybil = spread(attacks["jacobian"], keys=20)
    judges = detectors(thresholds)
    verdicts = [
        (
            await judges["similarity"].observe(client, features, labels),
            await judges["prada"].observe(client, features, labels),
        )
        for client, features, labels in interleave(sybil)
    ]
    across = [
        i for i, (similar, _) in enumerate(verdicts, start=1) if similar.scope == "cross-client"
    ]
    assert across and across[0] <= 300
    assert not any(
        prada.alarm for _, prada in verdicts
    )  # each key sent 20 queries: too few for PRADA
    single_key = await first_alarm(detectors(thresholds)["prada"], {"one-key": attacks["jacobian"]})
    assert single_key is not None  # the same stream from one key is flagged
