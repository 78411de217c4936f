"""Calibration to a target false-positive rate (Chen, Carlini & Wagner 2019) and writing the
thresholds into a policy file."""

from __future__ import annotations

import numpy as np
import pytest
import tomllib
import yaml

from guard.detectors import build_detector
from guard.detectors.calibration import (adequacy, calibrate, deal, expected_false_alarms, false_alarms,
                                         hold_out, interleave, replay, write_policy)
from guard.store.memory import MemoryStore
from conftest import monitor_drained


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


def test_adequacy_refuses_streams_too_short_for_prada_and_too_few_for_the_rate(rng):
    short = streams(rng, clients=10, queries=15)
    errors = adequacy(short, {"prada": {}, "similarity": {}}, fpr=0.001)
    assert "15 queries" in errors[0]
    assert any("10 benign clients" in line and "--fpr 0.1 " in line for line in errors)
    assert any("150 benign queries" in line and "--fpr" in line for line in errors)
    assert adequacy(streams(rng, 4, 130), {"prada": {}}, fpr=0.25) == []


def test_the_expected_false_alarm_rate_is_the_rank_of_the_threshold_among_fresh_scores():
    assert expected_false_alarms(9, 0.001) == pytest.approx(1 / 10)  # beyond the worst of 9: 1 in 10
    assert expected_false_alarms(4, 0.25) == pytest.approx(2 / 5)  # one of 4 alarms: the 2nd highest of 5
    assert 0.001 < expected_false_alarms(100_000, 0.001) < 0.00101


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


def _calibrate(*options: str):
    from typer.testing import CliRunner

    from guard.cli import app

    return CliRunner().invoke(app, ["calibrate", *options])


def test_guard_calibrate_refuses_a_single_client_and_a_rate_the_clients_cannot_show(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('secret = "a secret of sixteen+"\n')
    single = _calibrate(str(path), "--data", "breast_cancer", "--clients", "1")
    assert single.exit_code == 2 and "--clients 2 or more" in single.output
    too_few = _calibrate(str(path), "--data", "breast_cancer", "--clients", "4", "--detector", "prada")
    assert too_few.exit_code == 2 and "3 benign clients cannot show a false-alarm rate of 0.001" in too_few.output
    assert "--fpr 0.333" in too_few.output and "nothing written" in too_few.output
    assert path.read_text() == 'secret = "a secret of sixteen+"\n'
    done = _calibrate(str(path), "--data", "breast_cancer", "--clients", "4", "--detector", "prada", "--fpr", "0.34")
    assert done.exit_code == 0, done.output
    assert "expected false-alarm rate 50.00% of fresh benign clients" in done.output  # 2nd highest of 3 + 1
    assert "on 1 held-out benign clients" in done.output


async def _sanctioned(policy_file, streams, X_all, y_all) -> list[str]:
    """The clients blocked when each replays its stream through a guarded server with the policy's
    detectors (any alarm blocks), one server per client; the model answers each row's own label."""
    import httpx

    from guard import GuardMiddleware, Policy
    from guard.serving import prediction_app

    def answer(X: np.ndarray) -> np.ndarray:
        nearest = ((X[:, None, :] - X_all[None]) ** 2).sum(axis=2).argmin(axis=1)
        return np.eye(int(y_all.max()) + 1)[y_all[nearest]]

    detectors = Policy.from_file(policy_file).detectors
    route = {"features": "/features", "probabilities": "/probabilities", "sanctions": {"ladder": {"block": 60}}}
    blocked = []
    for client, (features, _) in streams.items():
        app = prediction_app(answer, X_all.shape[1])
        app.add_middleware(GuardMiddleware, policy=Policy(secret="a secret of sixteen+", routes={"/predict": route},
                                                          detectors=detectors))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 4000)),
                                     base_url="http://guarded") as http:
            codes = []
            for row in [*features.tolist(), features[0].tolist()]:  # the last one reads the standing
                codes.append((await http.post("/predict", json={"features": row})).status_code)
                await monitor_drained(app)
        if 403 in codes:
            blocked.append(client)
    return blocked


def test_a_benign_client_replaying_the_calibration_data_in_its_own_units_is_not_sanctioned(tmp_path):
    """The issue's case: thresholds calibrated on [0, 1]-scaled features judge clients that send the file's
    units (delta 0.90 on breast cancer): every benign client replaying the calibration data is blocked.
    Calibrated on the features as clients send them, the held-out client and all but the calibration
    clients the target rate lets alarm (floor(0.34 * 3) = 1) replay it untouched."""
    import asyncio

    from sklearn.datasets import load_breast_cancer

    from guard import data

    bunch = load_breast_cancer()
    csv = tmp_path / "tumours.csv"
    np.savetxt(csv, np.column_stack([bunch.data, bunch.target]), delimiter=",", comments="", fmt="%.6g",
               header=",".join([*(f"x{i}" for i in range(30)), "malignant"]))
    dataset = data.load(str(csv))
    X_all, y_all = dataset.raw(dataset.X), dataset.y  # the rows as the file has them
    for scale, most in (("--scale", 4), ("--no-scale", 1)):
        path = tmp_path / f"policy{scale}.toml"
        done = _calibrate(str(path), "--data", str(csv), "--clients", "4", "--detector", "prada", "--fpr", "0.34",
                          scale)
        assert done.exit_code == 0, done.output
        fitting, held_out = hold_out(deal(X_all, y_all, 4), 0.25)
        blocked = asyncio.run(_sanctioned(path, {**fitting, **held_out}, X_all, y_all))
        if scale == "--scale":
            assert len(blocked) == 4  # every benign client, the calibration's own included
        else:
            assert len(blocked) <= most and not set(blocked) & set(held_out)
