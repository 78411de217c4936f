"""Calibration to a target false-positive rate (Chen, Carlini & Wagner 2019) and writing the
thresholds into a policy file."""

from __future__ import annotations

import numpy as np
import pytest
import tomllib
import yaml

from guard.monitors import build_detector
from guard.monitors.calibration import calibrate, interleave, replay, write_policy
from guard.store.memory import MemoryStore


def streams(
    rng, clients: int, queries: int, repeats: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 64-d clients; the first ``repeats`` clients resend near-copies."""
    result = {}
    for client in range(clients):
        features = rng.random((queries, 64))
        if client < repeats:
            features[1::2] = features[::2] + rng.normal(0, 0.01, features[::2].shape)
        result[f"c{client}"] = (features, rng.integers(0, 3, queries))
    return result


def test_interleave_is_round_robin():
    data = {"a": (np.arange(3)[:, None], np.zeros(3)), "b": (np.arange(1)[:, None], np.zeros(1))}
    assert [(client, int(x[0, 0])) for client, x, _ in interleave(data)] == [
        ("a", 0),
        ("b", 0),
        ("a", 1),
        ("a", 2),
    ]


@pytest.mark.parametrize("fpr", [0.001, 0.05])
async def test_similarity_threshold_keeps_benign_queries_under_target(rng, fpr):
    benign = streams(rng, clients=6, queries=100, repeats=2)
    settings = {"quantization": 0.25, "window": 8, "top_n": 20, "salt": "s"}
    threshold = (await calibrate(benign, {"similarity": settings}, fpr=fpr))["similarity"][
        "threshold"
    ]
    detector = build_detector("similarity", {**settings, "threshold": threshold}, MemoryStore())
    scores = np.concatenate(list((await replay(detector, benign)).values()))
    assert np.mean(scores >= threshold) <= fpr
    assert np.mean(scores >= threshold - 1) > fpr  # and no higher than it needs to be


async def test_prada_delta_keeps_benign_clients_under_target(rng):
    benign = streams(rng, clients=8, queries=130, repeats=3)
    strict = (await calibrate(benign, {"prada": {}}))["prada"]["delta"]
    loose = (await calibrate(benign, {"prada": {}}, fpr=0.5))["prada"]["delta"]
    assert 0 < strict < loose < 1
    for delta, allowed in [(strict, 0), (loose, 4)]:
        detector = build_detector("prada", {"delta": delta}, MemoryStore())
        scores = await replay(detector, benign)
        alarmed = [
            client for client, values in scores.items() if (1 - values[values > 0] < delta).any()
        ]
        assert len(alarmed) <= allowed


async def test_prada_window_is_bounded_by_the_calibration_streams(rng):
    # W over more distances than any benign stream had is not what delta was calibrated on
    benign = streams(rng, clients=4, queries=130, repeats=3)
    length = max(len(features) for features, _ in benign.values())
    assert (await calibrate(benign, {"prada": {}}))["prada"]["max_distances"] == length
    assert (await calibrate(benign, {"prada": {"max_distances": 120}}))["prada"]["max_distances"] == 120
    short = streams(rng, clients=2, queries=20, repeats=1)
    assert (await calibrate(short, {"prada": {"min_distances": 50}}))["prada"]["max_distances"] == 51


async def test_calibrate_rejects_unknown_detectors_and_empty_data(rng):
    with pytest.raises(ValueError, match="no calibration rule"):
        await calibrate(streams(rng, 1, 5), {"other": {}})
    with pytest.raises(ValueError, match="at least one"):
        await calibrate({}, {"prada": {}})


def test_write_policy_merges_into_toml(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(
        'secret = "s3cret"\n[routes."/predict"]\nrounding = 2\nlabels = ["a", "b"]\n'
        "[detectors.similarity]\nwindow = 8\nthreshold = 3\n"
    )
    write_policy(path, {"prada": {"delta": 0.93}, "similarity": {"threshold": 11.0}})
    policy = tomllib.loads(path.read_text())
    assert policy["secret"] == "s3cret"
    assert policy["routes"]["/predict"] == {"rounding": 2, "labels": ["a", "b"]}
    assert policy["detectors"] == {
        "similarity": {"window": 8, "threshold": 11.0},
        "prada": {"delta": 0.93},
    }


def test_write_policy_creates_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    write_policy(path, {"prada": {"delta": 0.9}})
    write_policy(path, {"similarity": {"threshold": 7.0}})
    assert yaml.safe_load(path.read_text()) == {
        "detectors": {"prada": {"delta": 0.9}, "similarity": {"threshold": 7.0}}
    }
