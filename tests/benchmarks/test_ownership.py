"""DAWN's ownership test: exact under the null of an independent model, and ``guard verify`` against a
copy made through the real middleware, served live and loaded locally, beside an independent model."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch
from conftest import served_in_thread
from harness_cli import app as cli
from typer.testing import CliRunner

from attacks.ensemble import Architecture, TrainingConfig
from attacks.ownership import (
    ALPHA,
    OwnershipTest,
    Records,
    consistent_answers,
    p_value,
    queries_needed,
    watermarks_needed,
)
from benchmarks import executors, grid, run
from guard import models
from guard.middleware import GuardMiddleware
from guard.policy import Policy
from guard.serving import prediction_app
from guard.watermarks import write_lines

SECRET = "ownership test secret"
RATE = 0.05  # more watermarks per query than a deployment's 0.005, so the test's copy is small


def synthetic_records(n: int, k: int, rng: np.random.Generator) -> Records:
    watermarked = rng.random(n) < 0.1
    return Records(rng.random((n, 3)), rng.integers(0, k, n), watermarked, rng.choice(["a", "b"], n))


def test_an_independent_suspect_is_accused_at_most_at_the_level():
    """Under the null (answers independent of the record kind, here wrong 30% of the time towards
    two favourite classes, far from 1/k) the p-values are no smaller than uniform ones."""
    rng = np.random.default_rng(0)
    p_values = []
    for _ in range(400):
        records = synthetic_records(600, 10, rng)
        answers = np.where(rng.random(600) < 0.3, rng.integers(0, 2, 600), 9)
        p_values.append(OwnershipTest(alpha=0.05).judge(answers == records.labels, records).overall.p_value)
    assert np.mean(np.array(p_values) <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    assert np.mean(np.array(p_values) <= 0.5) > 0.3  # and not vacuous


def test_a_suspect_reproducing_watermarks_is_accused_per_client_and_overall():
    rng = np.random.default_rng(1)
    records = synthetic_records(2000, 10, rng)
    answers = np.where(records.watermarked & (rng.random(2000) < 0.5), records.labels, (records.labels + 1) % 10)
    verification = OwnershipTest().judge(answers == records.labels, records)
    assert verification.overall.accused and verification.overall.p_value < 1e-30
    assert all(e.accused for e in verification.clients) and verification.queries == 2000
    assert OwnershipTest(max_queries=500).chosen(records).labels.shape == (500,)


def test_the_p_value_is_the_hypergeometric_tail():
    assert p_value(2, 2, 2, 0) == pytest.approx(1 / 6)  # both agreements among 4 fall on the 2 watermarks
    assert p_value(0, 0, 10, 3) == 1.0 and p_value(5, 0, 5, 0) == 1.0


def digits_mlp_factory() -> torch.nn.Module:
    return models.make_model("mlp", 64, 10)


@pytest.fixture(scope="module")
def stolen(digits, digits_split, digits_mlp, tmp_path_factory):
    """A copy of the watermarked digits MLP trained on its answers to 1,500 queries through the
    middleware, an independent model trained on the attacker's own labels, and the records."""
    app = prediction_app(lambda X: models.predict_proba(digits_mlp, X), n_features=64)
    app.add_middleware(GuardMiddleware, policy=Policy(secret=SECRET, routes={"/predict": {
        "probabilities": "/probabilities", "features": "/features", "output": [f"watermark:{RATE}"]}}))
    rng = np.random.default_rng(0)
    pool = digits.X[digits_split.aux]
    queries = np.clip(pool[rng.integers(0, len(pool), 1500)] + rng.normal(0, 0.1, (1500, 64)), 0, 1)
    answers = asyncio.run(post(app, queries)).argmax(axis=1)
    guard = app.middleware_stack
    while not isinstance(guard, GuardMiddleware):
        guard = guard.app
    folder = tmp_path_factory.mktemp("ownership")
    write_lines(asyncio.run(guard.monitoring.watermarks.export()), str(folder / "records.jsonl"))
    copy = models.train_target("mlp", queries, answers, 10, seed=1, epochs=100)
    truth = models.predict_proba(digits_mlp, queries).argmax(axis=1)  # stands for the attacker's own labels
    independent = models.train_target("mlp", queries, truth, 10, seed=2, epochs=100)
    for name, model in (("copy", copy), ("independent", independent)):
        torch.save(model.state_dict(), folder / f"{name}.pt")
    return folder, app, copy, independent


async def post(app, rows: np.ndarray) -> np.ndarray:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answers = [(await client.post("/predict", json={"features": rows[start:start + 250].tolist()}))
                   .json()["probabilities"] for start in range(0, len(rows), 250)]
    return np.concatenate(answers)


def verify(*options: str) -> str:
    result = CliRunner().invoke(cli, ["verify", *options])
    assert result.exit_code == 0, result.output
    return result.output


def test_guard_verify_accuses_the_local_copy_not_the_independent_model(stolen):
    folder = stolen[0]
    common = ["--records", str(folder / "records.jsonl"), "--model", "test_ownership:digits_mlp_factory"]
    copied = verify(*common, "--weights", str(folder / "copy.pt"))
    independent = verify(*common, "--weights", str(folder / "independent.pt"))
    overall = lambda output: output.split("overall:")[1].splitlines()[1]
    assert "ACCUSED" in overall(copied) and "not accused" in overall(independent), copied + independent
    assert "assumptions:" in copied


def test_guard_verify_queries_a_live_suspect(stolen):
    folder, _, copy, _ = stolen
    suspect = prediction_app(lambda X: models.predict_proba(copy, X), n_features=64)
    with served_in_thread(suspect) as port:
        output = verify("--records", str(folder / "records.jsonl"), "--url", f"http://127.0.0.1:{port}/predict",
                        "--classes", "10")
    line = output.split("overall:")[1].splitlines()[1]
    assert "ACCUSED" in line, output
    assert float(line.split("p = ")[1].split()[0]) <= 1e-6


def test_the_filtering_attacker_drops_isolated_wrong_labels():
    rng = np.random.default_rng(3)
    centres = rng.random((4, 5)) * 4
    y = rng.integers(0, 4, 800)
    X = centres[y] + rng.normal(0, 0.3, (800, 5))
    flipped = rng.random(800) < 0.05
    labels = np.where(flipped, (y + 1) % 4, y)
    keep = consistent_answers(X, labels, 4, Architecture("softmax"), TrainingConfig(epochs=20))
    assert (~keep[flipped]).mean() > 0.9 and keep[~flipped].mean() > 0.95


def test_guard_verify_needs_exactly_one_suspect(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text('{"kind": "watermark", "client": "c", "time": 1.0, "features": [0.5], "label": 1, '
                       '"model_label": 0}\n')
    for options in ([], ["--url", "http://127.0.0.1:1/predict", "--weights", "w.pt"]):
        result = CliRunner().invoke(cli, ["verify", "--records", str(records), *options])
        assert result.exit_code == 2 and "name one suspect" in result.output


def test_a_claim_needs_enough_watermarks_whatever_the_copy_reproduces():
    """With fewer than ``watermarks_needed`` watermarks, even a copy reproducing all of them and never
    agreeing with a control label is not accused at alpha; with that many it is; the queries are
    those watermarks over the rate."""
    for null in (0.0, 0.05, 0.2):
        needed = watermarks_needed(null)
        below, at = ((m, 9 * m, round(null * 9 * m)) for m in (needed - 1, needed))
        assert p_value(below[0], below[0], *below[1:]) > ALPHA >= p_value(at[0], at[0], *at[1:])
        assert queries_needed(0.005, null) == pytest.approx(needed / 0.005, abs=1)
    assert watermarks_needed(0.2) > watermarks_needed(0.0) >= 5  # C(10m, m) must pass 1e6


def test_the_bench_verifies_each_extraction_copy_of_a_watermark_cell(tmp_path):
    """``guard bench`` on a watermark defence: besides the attack's own row, an ownership row whose
    verdict is its p-value at alpha, tested beside the 54 independent models, and the report's
    ownership section."""
    config = grid.configure("quick", datasets=("breast_cancer",), defences=("watermark",), attacks=("copycat",))
    finished = run.run(config, tmp_path / "out", executors.LocalPool(1), tmp_path / "cache", progress=False)
    rows = {r["attack"]: r for r in json.loads(finished.paths["json"].read_text())["rows"]}
    assert rows["copycat"]["family"] == "extraction"
    owned = rows["ownership: copycat"]
    metrics = {name: measure["values"][0] for name, measure in owned["metrics"].items()}
    assert owned["family"] == "ownership" and owned["status"] == "ok"
    assert metrics["verified"] == float(metrics["p_value"] <= ALPHA)
    assert metrics["independent_models"] == 54 and metrics["false_accusations"] == 0
    assert metrics["verification_queries"] == metrics["watermarks"] + metrics["controls"] > 0
    assert metrics["queries_needed"] == queries_needed(0.005, metrics["null_agreement"])
    report_text = finished.paths["markdown"].read_text()
    assert "## Ownership" in report_text and "| breast_cancer | mlp | watermark | copycat |" in report_text
