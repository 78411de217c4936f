"""``guard train-dp``: trains to a target epsilon and writes the model beside its privacy report."""
from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guard import data, dp, models
from guard.cli import app

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order"),
              pytest.mark.usefixtures("one_torch_thread")]



def test_train_dp_on_bundled_data_writes_model_and_report(tmp_path):
    result = CliRunner().invoke(app, [
        "train-dp", "--data", "breast_cancer", "--model", "softmax", "--target-epsilon", "2",
        "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--accountant", "rdp", "--seed", "0",
        "--audit", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "epsilon=" in result.output  # the progress bar shows the budget spent so far
    report = json.loads((tmp_path / dp.REPORT_FILE).read_text())
    assert f"audited epsilon >= {report['audit']['epsilon_lower_bound']:.2f}" in result.output
    assert report["audit"]["canaries"] == 62 and report["audit"]["confidence"] == 0.95  # one per weight
    assert 0 <= report["audit"]["epsilon_lower_bound"] <= report["audit"]["epsilon"]
    assert report["epsilon"] <= 2.0 and report["target_epsilon"] == 2.0
    assert report["dataset_size"] == 427 and report["epochs"] == 3  # 75% of 569 rows
    model = models.make_model("softmax", 30, 2)
    model.load_state_dict(dp.load_state_dict(tmp_path / dp.MODEL_FILE))
    assert report["test_accuracy"] > 0.8 and report["non_private_test_accuracy"] > 0.85


def test_train_dp_with_a_user_model_and_csv_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    np.savetxt(tmp_path / "data.csv", np.column_stack([X, y]), delimiter=",",
               header="a,b,c,d,label", comments="")
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def build(d, k):\n"
        "    return nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(),\n"
        "                         nn.Linear(16, k))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    arguments = ["train-dp", "--data", str(tmp_path / "data.csv"), "--model", "my_models:build",
                 "--target-epsilon", "4", "--epochs", "3", "--batch-size", "32", "--lr", "0.05",
                 "--accountant", "rdp", "--seed", "0", "--out", str(out)]
    refused = CliRunner().invoke(app, [*arguments, "--no-fix"])
    assert refused.exit_code == 2 and "BatchNorm" in refused.output and not out.exists()
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = dp.PrivacyReport.load(out / dp.REPORT_FILE)
    assert report.model_changes == [("1: BatchNorm1d -> GroupNorm with 1 group(s) (pretrained "
                                     "running statistics discarded)")]
    assert report.epsilon <= 4.0 and report.dataset_size == 225 and 0 <= report.test_accuracy <= 1
    # The saved weights fit the fixed architecture (what a user rebuilds to serve the model).
    fixed, _ = dp.prepare_model(importlib.import_module("my_models").build(4, 2))
    fixed.load_state_dict(dp.load_state_dict(out / dp.MODEL_FILE))


def test_the_saved_model_loads_into_the_users_factory_and_predicts_on_raw_features(tmp_path, monkeypatch):
    """Labels 0/1/7 and features far from [0, 1]: the loaded model takes the file's features and its
    ``classes`` give the file's labels back."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 3)) * [100.0, 0.01, 5.0] + [1000.0, 0.0, -50.0]
    score = (X[:, 0] - 1000) / 100 + (X[:, 1] / 0.01)
    y = np.select([score < -0.7, score < 0.7], [0, 1], 7)
    np.savetxt(tmp_path / "raw.csv", np.column_stack([X, y]), delimiter=",", header="a,b,c,label", comments="")
    (tmp_path / "raw_models.py").write_text(
        "from torch import nn\n"
        "def build(d, k):\n"
        "    return nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, k))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train-dp", "--data", str(tmp_path / "raw.csv"), "--model", "raw_models:build",
                                      "--target-epsilon", "8", "--epochs", "8", "--batch-size", "64",
                                      "--lr", "0.05", "--accountant", "rdp", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "7 -> 2" in result.output
    report = dp.PrivacyReport.load(out / dp.REPORT_FILE)
    assert report.classes == [0, 1, 7]
    build = importlib.import_module("raw_models").build
    served = dp.load(out, lambda: build(3, 3))
    with torch.no_grad():
        predicted = served(torch.as_tensor(X, dtype=torch.float32)).argmax(dim=1).numpy()
    labels = np.asarray(served.classes)[predicted]
    scaled = data.load(str(tmp_path / "raw.csv"))
    with torch.no_grad():  # the same answers as the trained network gives on the scaled data
        inner = served.model(torch.as_tensor(scaled.X)).argmax(dim=1).numpy()
    assert (inner == predicted).all()
    assert abs((labels == y).mean() - report.test_accuracy) < 0.1 and (labels == y).mean() > 0.5


@pytest.mark.parametrize("content, name, message", [
    ("a,b,label\n1,2,0\n3,4,0\n", "one.csv", "at least two classes"),
    (None, "missing.csv", "missing.csv"),
    ("a,b,label\n1,2,cat\n3,4,dog\n", "strings.csv", "could not convert"),
    ("a,b,label\n1,nan,0\n3,4,1\n", "nan.csv", "NaN"),
    ("npz", "keys.npz", "arrays named 'X' and 'y'"),
    ("a,b,label\n1,2,0\n3,4,1\n", "fine.csv", "No module named 'no_such_module'"),
])
def test_data_errors_are_one_line_messages(tmp_path, content, name, message):
    path = tmp_path / name
    if content == "npz":
        np.savez(path, features=np.zeros((4, 2)), labels=np.arange(4))
    elif content is not None:
        path.write_text(content)
    model = "no_such_module:build" if name == "fine.csv" else "softmax"
    result = CliRunner().invoke(app, ["train-dp", "--data", str(path), "--model", model, "--target-epsilon", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_train_dp_console_shows_no_third_party_warnings(tmp_path):
    """The real command, as a user runs it (Python's default warning filters, own process): its console
    carries the progress bar and the report, never a library's warning."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "from guard.cli import main; main()", "train-dp", "--data", "digits",
               "--model", "mlp", "--target-epsilon", "1", "--epochs", "1", "--seed", "0", "--audit",
               "--out", str(tmp_path)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    assert "audited epsilon >=" in done.stdout and "DP-SGD" in done.stderr  # the report and the progress bar
    console = done.stdout + done.stderr
    assert "Warning" not in console and "warn(" not in console, console
