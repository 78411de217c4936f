"""A ``guard train-dp`` model in production: ``guard.dp.load`` with the factory line ``train-dp``
prints, ``predict_proba`` / ``predict`` on raw features with their input checks, and one-line errors
for factories and weights that do not fit."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guard import dp, models
from guard.cli import app

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order"),
              pytest.mark.usefixtures("one_torch_thread")]

TRAIN = ["--target-epsilon", "8", "--epochs", "4", "--batch-size", "32", "--lr", "0.1", "--accountant", "rdp",
         "--seed", "0"]


def raw_data(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Three features far from [0, 1], labels 3 and 7 split by the first feature."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3)) * [100.0, 1.0, 0.01] + [1000.0, 0.0, 5.0]
    return X, np.where(X[:, 0] > 1000.0, 7, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """A run of ``guard train-dp`` on a CSV: its directory and what it printed."""
    directory = tmp_path_factory.mktemp("dp-serving")
    X, y = raw_data()
    np.savetxt(directory / "raw.csv", np.column_stack([X, y]), delimiter=",", header="a,b,c,label", comments="")
    out = directory / "model"
    result = CliRunner().invoke(app, ["train-dp", "--data", str(directory / "raw.csv"), "--model", "softmax",
                                      *TRAIN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_printed_load_line_serves_the_model_on_raw_features(trained):
    out, printed = trained
    lines = printed[printed.index("  import guard.dp"):].splitlines()
    namespace: dict = {}
    exec("\n".join(line.strip() for line in lines[:2]), namespace)  # noqa: S102 (what a user pastes)
    served = namespace["served"]
    assert lines[1].strip() == f"served = guard.dp.load({str(out)!r}, lambda: guard.models.make_model('softmax', 3, 2))"
    X, y = raw_data(200)
    probabilities = served.predict_proba(X)
    with torch.no_grad():  # calling the module gives the logits; predict_proba is their softmax
        logits = served(torch.as_tensor(X, dtype=torch.float32))
    np.testing.assert_allclose(probabilities, torch.softmax(logits.double(), dim=1).numpy(), rtol=1e-6)
    assert probabilities.dtype == np.float64 and probabilities.shape == (200, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    accuracy = (served.predict(X) == y).mean()  # the file's labels, 3 and 7, not class indices
    report = dp.PrivacyReport.load(out / dp.REPORT_FILE)
    assert set(served.predict(X)) == {3, 7} and accuracy > 0.6 and abs(accuracy - report.test_accuracy) < 0.1
    assert served.predict(X.tolist()).tolist() == served.predict(X).tolist()  # nested lists too


@pytest.mark.parametrize("rows, message", [
    (np.ones((2, 4)), "expected rows of 3 features (as in the training data), got 4"),
    (np.array([[1000.0, 0.0, 5.0], [np.nan, 0.0, 5.0]]), "must be finite: row(s) [1] hold NaN or infinity"),
    (np.array([[np.inf, 0.0, 5.0]]), "must be finite: row(s) [0]"),
    (np.array([1000.0, 0.0, 5.0]), "a 2-D array of shape (n, 3), got shape (3,)"),
    ([["a", "b", "c"]], "must be numbers"),
    ([[1.0, 2.0, 3.0], [1.0, 2.0]], "must be numbers in rows of equal length"),
])
def test_predict_proba_refuses_bad_rows_in_one_line(trained, rows, message):
    served = dp.load(trained[0], lambda: models.make_model("softmax", 3, 2))
    with pytest.raises(ValueError) as refused:
        served.predict_proba(rows)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_factories_and_weights_that_do_not_fit_are_one_line_errors(trained, tmp_path):
    out = trained[0]
    with pytest.raises(TypeError, match=r"^the model factory <lambda> returned a tuple, not a torch.nn.Module"):
        dp.load(out, lambda: (models.make_model("softmax", 3, 2), None))
    with pytest.raises(ValueError, match="do not fit the model the factory builds") as wrong:
        dp.load(out, lambda: models.make_model("mlp", 3, 2))
    assert "\n" not in str(wrong.value) and "size mismatch" in str(wrong.value)
    with pytest.raises(FileNotFoundError, match="privacy_report.json is missing"):
        dp.load(tmp_path, lambda: models.make_model("softmax", 3, 2))


def test_train_dp_refuses_a_factory_that_does_not_build_a_network_in_one_line(tmp_path, monkeypatch):
    X, y = raw_data(60)
    np.savetxt(tmp_path / "raw.csv", np.column_stack([X, y]), delimiter=",", header="a,b,c,label", comments="")
    (tmp_path / "user_models.py").write_text(
        "from torch import nn\n"
        "def pair(d, k):\n"
        "    return nn.Linear(d, k), nn.CrossEntropyLoss()\n"
        "def too_wide(d, k):\n"
        "    return nn.Linear(d + 1, k)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for factory, message in [("pair", "the model factory pair returned a tuple, not a torch.nn.Module"),
                             ("too_wide", "the model cannot take the data's rows of shape (3,)")]:
        result = CliRunner().invoke(app, ["train-dp", "--data", str(tmp_path / "raw.csv"), "--model",
                                          f"user_models:{factory}", *TRAIN, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith(f"guard train-dp: {message}")
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_run_saved_without_preprocessing_still_checks_its_rows(tmp_path):
    """``dp.save`` from the library, no scaling saved: the width is the network's; its refusal is a
    one-line ``ValueError`` too."""
    X, y = raw_data(200)
    network = models.make_model("softmax", 3, 2)
    trained, report = dp.train_private(network, ((X - X.mean(0)) / X.std(0), (y == 7).astype(int)),
                                       target_epsilon=8, epochs=1, batch_size=32, accountant="rdp")
    dp.save(trained, report, tmp_path)
    served = dp.load(tmp_path, lambda: models.make_model("softmax", 3, 2))
    assert served.predict_proba(np.zeros((2, 3))).shape == (2, 2) and served.classes is None
    with pytest.raises(ValueError, match=re.escape("the model cannot take rows of 4 features: mat1 and mat2")):
        served.predict_proba(np.zeros((2, 4)))
