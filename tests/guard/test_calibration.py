"""Calibration to a target false-positive rate (Chen, Carlini & Wagner 2019) and writing the
thresholds into a policy file."""

from __future__ import annotations

import numpy as np
import pytest
import tomllib
import yaml

from guard.detectors import build_detector
from guard.detectors.calibration import adequacy, calibrate, false_alarms, interleave, replay, write_policy
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


def test_write_policy_keeps_the_toml_files_comments(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('# production policy\nsecret = "s3cret"  # rotate yearly\n\n'
                    '[detectors.prada]  # watch extraction\nmin_distances = 50\n')
    write_policy(path, {"prada": {"delta": 0.9}, "similarity": {"threshold": 7.0}})
    text = path.read_text()
    assert "# production policy" in text and "# rotate yearly" in text and "# watch extraction" in text
    assert tomllib.loads(text)["detectors"] == {"prada": {"min_distances": 50, "delta": 0.9},
                                                "similarity": {"threshold": 7.0}}


def test_adequacy_refuses_streams_too_short_for_prada_and_warns_on_few_clients(rng):
    short = streams(rng, clients=10, queries=15)
    errors, warnings = adequacy(short, {"prada": {}, "similarity": {}}, fpr=0.001)
    assert len(errors) == 1 and "15 queries" in errors[0]
    assert any("10 benign clients" in line for line in warnings)
    assert any("150 benign queries" in line for line in warnings)
    assert adequacy(streams(rng, 4, 130), {"prada": {}}, fpr=0.25) == ([], [])


async def test_false_alarms_count_clients_and_queries(rng):
    benign = streams(rng, clients=4, queries=40)
    rates = await false_alarms(benign, {"similarity": {"threshold": 0.0, "salt": "s"}})
    assert rates["similarity"] == {"clients": 1.0, "queries": 1.0}  # a zero threshold alarms on everything
    never = await false_alarms(benign, {"similarity": {"threshold": 1e9, "salt": "s"}})
    assert never["similarity"] == {"clients": 0.0, "queries": 0.0}


def test_guard_calibrate_refuses_a_small_data_set_and_reports_held_out_false_alarms(tmp_path):
    from typer.testing import CliRunner

    from guard.cli import app

    iris = tmp_path / "iris.npz"
    data = np.random.default_rng(0)
    np.savez(iris, X=data.normal(size=(150, 4)), y=np.repeat([0, 1, 2], 50))
    path = tmp_path / "policy.toml"
    path.write_text('# mine\nsecret = "a secret of sixteen+"\n')
    refused = CliRunner().invoke(app, ["calibrate", str(path), "--data", str(iris), "--clients", "10"])
    assert refused.exit_code == 2 and "nothing written" in refused.output
    assert path.read_text() == '# mine\nsecret = "a secret of sixteen+"\n'
    result = CliRunner().invoke(app, ["calibrate", str(path), "--data", "digits", "--clients", "8",
                                      "--detector", "similarity", "--fpr", "0.01"])
    assert result.exit_code == 0, result.output
    assert "held-out benign clients" in result.output and "# mine" in path.read_text()
