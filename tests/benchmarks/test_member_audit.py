"""Member audits of a user's trained model (``guard audit --members --non-members``): an MLP trained
for 100 epochs on 150 digits as they are in the user's CSV (pixel values 0-16), served by a real ASGI
app or given as a factory and a state dict; the non-members are 150 records it never saw, the
population 300 others."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from harness_cli import app as cli
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from attacks.ensemble import TrainingConfig
from benchmarks.member_audit import member_audit
from guard import models
from guard.serving import prediction_app


def digits_mlp_factory(n_features: int, n_classes: int) -> torch.nn.Module:
    return models.make_model("mlp", n_features, n_classes)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """members.csv, non_members.csv, population.csv and the model's state dict, in one folder."""
    digits = load_digits()
    folder = tmp_path_factory.mktemp("member-audit")
    order = np.random.default_rng(7).permutation(len(digits.target))
    header = ",".join([*(f"pixel{i}" for i in range(64)), "digit"])
    for name, rows in (("members", order[:150]), ("non_members", order[150:300]), ("population", order[300:600])):
        np.savetxt(folder / f"{name}.csv", np.column_stack([digits.data[rows], digits.target[rows]]), delimiter=",",
                   header=header, comments="", fmt="%g")
    torch.manual_seed(7)
    model = models.train(digits_mlp_factory(64, 10), digits.data[order[:150]], digits.target[order[:150]], epochs=100,
                         seed=7)
    torch.save(model.state_dict(), folder / "model.pt")
    return folder, model


def _records(path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_member_audit_of_a_served_model_scores_every_record_above_the_no_model_reference(tmp_path, user_files):
    folder, model = user_files
    server = prediction_app(lambda X: models.predict_proba(model, X), 64)
    lines = []
    paths = member_audit(folder / "members.csv", folder / "non_members.csv", tmp_path, population=folder / "population.csv",
                         url="http://model/predict", client=server, n_references=4,
                         training=TrainingConfig(epochs=100), echo=lines.append)
    results = json.loads(paths["json"].read_text())
    measures, strongest = results["measures"], results["strongest"]
    assert set(measures) == {"threshold", "lira-online", "lira-offline", "rmia-online", "rmia-offline"}
    best = measures[strongest]["tpr_at_1pct_fpr"]
    assert best["interval"][0] > best["no_model_reference"] == 0.01, measures  # above guessing, beyond its interval
    assert measures["rmia-online"]["auc"] > 0.6 and measures["lira-online"]["auc"] > 0.6
    records = _records(paths["records"])
    assert len(records) == 300
    assert sorted(int(r["row"]) for r in records if r["file"] == "members") == list(range(150))
    exposure = [float(r[f"exposure_fpr ({strongest})"]) for r in records]
    assert exposure == sorted(exposure) and exposure[0] < 0.05  # most exposed first
    assert {"score_rmia-online", "score_lira-online"} <= set(records[0])
    assert "| rmia-online |" in paths["markdown"].read_text()
    assert any("300 population records" in line for line in lines)


def test_member_audit_cli_of_a_local_model_without_a_population(tmp_path, user_files):
    folder, _ = user_files
    result = CliRunner().invoke(cli, [
        "audit", "--members", str(folder / "members.csv"), "--non-members", str(folder / "non_members.csv"),
        "--model", "test_member_audit:digits_mlp_factory", "--weights", str(folder / "model.pt"),
        "--references", "2", "--epochs", "100", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "no population" in result.output
    measures = json.loads((tmp_path / "results.json").read_text())["measures"]
    assert measures["rmia-online"]["status"] == "ok" and measures["threshold"]["auc"] > 0.55
    assert len(_records(tmp_path / "record_scores.csv")) == 300


def test_member_audit_cli_refuses_half_a_request(tmp_path, user_files):
    folder, _ = user_files
    result = CliRunner().invoke(cli, ["audit", "--members", str(folder / "members.csv"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--non-members" in result.output
    result = CliRunner().invoke(cli, ["audit", "--members", str(folder / "members.csv"), "--non-members",
                                      str(folder / "non_members.csv"), "--weights", str(folder / "model.pt")])
    assert result.exit_code == 2 and "--model" in result.output


def test_endpoint_audit_sends_membership_attacks_to_the_member_audit():
    result = CliRunner().invoke(cli, ["audit", "--url", "http://127.0.0.1:9/p", "--attacks", "rmia-online,copycat"])
    assert result.exit_code == 2 and "--members" in result.output
