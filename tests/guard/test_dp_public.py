"""Public pretraining before DP-SGD (``guard.dp.public``, ``train_private(public_data=...)``,
``guard train-dp --public``) and ``guard.data.rows_like``, which reads a public file as the private one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guard import data, dp, models
from guard.cli import app

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order"),
              pytest.mark.usefixtures("one_torch_thread")]


def _task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    return X, (X[:, 0] - X[:, 1] > 0).astype(np.int64)


def _train(public_data):
    torch.manual_seed(0)
    # four tiny, very noisy steps: DP-SGD alone barely moves the weights from where they start
    return dp.train_private(models.make_model("softmax", 4, 2), _task(200, 0), target_epsilon=0.5, epochs=1,
                            batch_size=50, lr=1e-3, accountant="rdp", seed=0, test_data=_task(400, 2),
                            public_data=public_data)


def test_dp_sgd_starts_from_the_publicly_pretrained_weights_and_the_baseline_too():
    _, alone = _train(None)
    _, pretrained = _train(_task(300, 1))
    assert alone.public_rows == 0 and pretrained.public_rows == 300
    assert alone.test_accuracy < 0.8 and alone.non_private_test_accuracy < 0.8
    assert pretrained.test_accuracy > 0.95 and pretrained.non_private_test_accuracy > 0.95
    assert pretrained.public_only_test_accuracy > 0.95 and alone.public_only_test_accuracy is None
    assert pretrained.epsilon == pytest.approx(alone.epsilon)  # the public rows cost the private ones nothing


def test_public_data_the_model_cannot_take_is_refused():
    X, y = _task(50, 1)
    with pytest.raises(dp.DPConfigError, match="public data: the model cannot take"):
        _train((X[:, :3], y))
    with pytest.raises(dp.DPConfigError, match="public data: labels must lie in 0..1"):
        _train((X, y + 1))


def test_rows_like_scales_through_the_reference_box_and_maps_its_labels():
    reference = data.from_arrays("private", np.array([[0.0, 10.0], [4.0, 30.0]]), np.array(["cat", "dog"]))
    other = data.from_arrays("public", np.array([[2.0, 20.0], [8.0, 10.0]]), np.array(["dog", "cat"]))
    X, y = data.rows_like(reference, other)
    assert X.tolist() == [[0.5, 0.5], [2.0, 0.0]] and y.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"labels \['bird'\] that private lacks"):
        data.rows_like(reference, data.from_arrays("public", np.ones((2, 2)), np.array(["cat", "bird"])))
    with pytest.raises(ValueError, match="public has 3 features, private 2"):
        data.rows_like(reference, data.from_arrays("public", np.ones((2, 3)), np.array([0, 1])))


def test_train_dp_pretrains_on_a_public_file_and_warns_of_private_rows_in_it(tmp_path):
    X, y = _task(400, 3)
    header = "a,b,c,d,label"
    np.savetxt(tmp_path / "private.csv", np.column_stack([X[:300], y[:300]]), delimiter=",", header=header,
               comments="")
    public = tmp_path / "public.csv"
    np.savetxt(public, np.column_stack([X[250:], y[250:]]), delimiter=",", header=header, comments="")
    arguments = ["train-dp", "--data", str(tmp_path / "private.csv"), "--public", str(public), "--model", "softmax",
                 "--target-epsilon", "2", "--epochs", "2", "--accountant", "rdp", "--seed", "0",
                 "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = dp.PrivacyReport.load(tmp_path / "out" / dp.REPORT_FILE)
    assert report.public_rows == 150
    assert f"(both pretrained on 150 public rows, which alone give {report.public_only_test_accuracy:.3f})" in result.output
    assert report.test_accuracy > report.public_only_test_accuracy and "add no test accuracy" not in result.output
    # at epsilon 0.5 with a large step the noise undoes what the public rows taught: the private rows add nothing
    noisy = CliRunner().invoke(app, [*arguments, "--target-epsilon", "0.5", "--lr", "0.5"])
    assert noisy.exit_code == 0, noisy.output
    report = dp.PrivacyReport.load(tmp_path / "out" / dp.REPORT_FILE)
    assert report.test_accuracy <= report.public_only_test_accuracy
    assert "note: the private rows add no test accuracy at this epsilon" in noisy.output
    private_train = data.split(data.load(str(tmp_path / "private.csv")), seed=0, train=0.75, test=0.25).train
    shared = int((private_train >= 250).sum())  # the private training rows the public file repeats
    assert shared > 0 and f"warning: {shared} of the 225 private training rows are also in --public" in result.output
    np.savetxt(public, [[1, 2, 0], [3, 4, 1]], delimiter=",", header="a,b,label", comments="")
    refused = CliRunner().invoke(app, arguments)
    assert refused.exit_code == 2 and "public has 2 features, private 4" in refused.output
