"""Users' own data through ``guard bench`` (issue 14): an NPZ of images and a CSV with a named
sensitive column run end to end; the bundled faces; request batches sized to the body limit; the
judge of reconstructions; the refusal of an underfitting target."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from attacks.inversion import descend
from attacks.scoring import Judge
from benchmarks import datasets, endpoint
from benchmarks.tabular import sensitive_breast_cancer
from harness_cli import app


def test_bundled_faces_follow_fredriksons_protocol():
    faces = datasets.load("faces")
    assert faces.X.shape == (400, 32 * 32) and faces.image_shape == (32, 32) and faces.n_classes == 40
    split = datasets.split(faces, seed=0)
    assert (np.bincount(faces.y[split.train]) == 7).all() and (np.bincount(faces.y[split.held_out]) == 3).all()
    assert len(np.intersect1d(split.train, split.held_out)) == 0
    assert datasets.load("faces64").image_shape == (64, 64)


def test_image_arrays_are_kept_as_images_and_scaled_as_pictures(tmp_path):
    images = np.random.default_rng(0).uniform(0, 200, size=(12, 6, 5))
    images[:, 0, 0] = 10.0  # a pixel dark in every image stays dark (no per-column stretching)
    np.savez(tmp_path / "pictures.npz", X=images, y=np.arange(12) % 3)
    data = datasets.load(str(tmp_path / "pictures.npz"))
    assert data.image_shape == (6, 5) and data.X.shape == (12, 30)
    low, high = images.min(), images.max()
    assert np.allclose(data.X, ((images - low) / (high - low)).reshape(12, -1), atol=1e-6)
    np.savez(tmp_path / "flat.npz", X=images.reshape(12, -1), y=np.arange(12) % 3, image_shape=[6, 5])
    assert datasets.load(str(tmp_path / "flat.npz")).image_shape == (6, 5)


def test_a_sensitive_column_is_named_and_must_be_discrete(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("age,smoker,label\n30,0,1\n40,1,0\n50,1,1\n60,0,0\n")
    data = datasets.load(str(path), sensitive="smoker")
    assert data.sensitive == 1 and data.sensitive_values.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="no column named"):
        datasets.load(str(path), sensitive="income")
    continuous = tmp_path / "continuous.csv"
    continuous.write_text("x,label\n" + "".join(f"{i * 0.37},{i % 2}\n" for i in range(30)))
    with pytest.raises(ValueError, match="distinct values"):
        datasets.load(str(continuous), sensitive="x")


def test_request_batches_fit_the_body_limit():
    worst = json.dumps({"features": [[-0.00012345678901234567] * 1024] * endpoint.rows_per_request(1024, 1 << 20)})
    assert len(worst) <= 1 << 20
    assert endpoint.rows_per_request(1024, 1 << 20) < 512 and endpoint.rows_per_request(10, 1 << 20) == 512
    assert endpoint.rows_per_request(100_000, 4096) == 1


def test_the_stopping_rule_lets_a_plateau_run_a_whole_window():
    flat = lambda X, rows: (np.full(len(rows), 0.5), np.zeros_like(X))  # rounded confidences: no change
    result = descend(flat, np.zeros((1, 3)), alpha=500, beta=40, gamma=0.0, step=0.1, process=lambda X: X)
    assert result.iterations.tolist() == [40]


def test_the_judge_sees_faces_not_brightness_and_a_blank_image_gets_chance():
    faces = datasets.load("faces")
    split = datasets.split(faces, seed=0)
    held = split.held_out
    judge = Judge(faces.X[held], faces.y[held], faces.image_shape, seed=0)
    photos, labels = faces.X[split.train][:80], faces.y[split.train][:80]
    dimmed = 0.3 * photos + 0.5  # brightness and contrast changed
    plain = judge.measures(photos, labels)
    assert judge.measures(dimmed, labels)["identification_accuracy"] == plain["identification_accuracy"] > 0.7
    assert plain["lineup_accuracy"] > 0.7
    blank = judge.measures(np.full_like(photos, 0.5), labels)
    assert blank["lineup_accuracy"] < 0.35  # ties do not count as hits
    assert 0 < blank["ssim"] < judge.measures(photos, labels)["ssim"]


@pytest.fixture(scope="module")
def image_npz(tmp_path_factory):
    """A user's NPZ of images: 10 people of the faces at 16x16, as an (n, h, w) array."""
    faces = datasets.load("faces")
    keep = faces.y < 10
    images = faces.X[keep].reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4))
    path = tmp_path_factory.mktemp("user") / "my_faces.npz"
    np.savez(path, X=(255 * images).astype(np.uint8), y=faces.y[keep])
    return path


def _bench(out, *options):
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out), *options])
    return result, (json.loads((out / "results.json").read_text()) if result.exit_code == 0 else None)


def test_a_users_npz_of_images_runs_end_to_end(tmp_path, image_npz):
    result, results = _bench(tmp_path, "--data", str(image_npz), "--defences", "none,round:2",
                             "--attacks", "inverse-model,mi-face,shadow,map-attribute",
                             "--max-body-bytes", "65536", "--epochs", "120",
                             "--hidden", "64", "--activation", "relu", "--lr", "0.01")  # small: the test is of the flow
    assert result.exit_code == 0, result.output
    rows = {(r["model"], r["defence"], r["attack"]): r for r in results["rows"]}
    assert results["config"]["image_shapes"] == {"my_faces": [16, 16]}
    inverse = rows[("mlp", "none", "inverse-model")]
    assert inverse["status"] == "ok" and inverse["metrics"]["reference_lineup_accuracy"]["mean"] < 0.5
    assert "advantage_lineup_accuracy" in inverse["metrics"] and inverse["chance"] < 0.5
    assert rows[("mlp", "none", "shadow")]["status"] == "ok"  # classes missing from its quarter do not abort
    skipped = rows[("mlp", "none", "map-attribute")]
    assert skipped["status"] == "not-applicable" and "--sensitive" in skipped["reason"]
    markdown = (tmp_path / "report.md").read_text()
    assert "no-model reference" in markdown and "--sensitive" in markdown
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_a_csv_with_a_named_sensitive_column_runs_end_to_end(tmp_path):
    table = sensitive_breast_cancer()
    names = ["concave_level", *(f"x{i}" for i in range(1, table.dataset.n_features)), "malignant"]
    path = tmp_path / "patients.csv"
    np.savetxt(path, np.column_stack([table.dataset.X, table.dataset.y]), delimiter=",",
               header=",".join(names), comments="", fmt="%.6g")
    result, results = _bench(tmp_path / "out", "--data", str(path), "--sensitive", "concave_level",
                             "--defences", "none,label_only",
                             "--attacks", "map-attribute,map-attribute-label-only,learned-attribute,membership-attribute")
    assert result.exit_code == 0, result.output
    rows = {(r["defence"], r["attack"]): r for r in results["rows"]}
    confidence = rows[("none", "map-attribute")]
    assert confidence["status"] == "ok" and confidence["chance"] == confidence["metrics"]["reference_accuracy"]["mean"]
    assert rows[("label_only", "map-attribute-label-only")]["status"] == "ok"
    assert ("label_only", "map-attribute") not in rows  # confidences are not published there
    for defence in ("none", "label_only"):  # the learned attacks read labels where there are no confidences
        for attack in ("learned-attribute", "membership-attribute"):
            learned = rows[(defence, attack)]
            assert learned["status"] == "ok" and learned["family"] == "attribute", learned["reason"]
            assert learned["chance"] == learned["metrics"]["reference_accuracy"]["mean"]
    assert "reference_accuracy" in (tmp_path / "out" / "report.md").read_text() or \
        "no-model reference" in (tmp_path / "out" / "report.md").read_text()


def test_an_underfitting_target_is_refused_with_its_accuracy(tmp_path, image_npz):
    result, _ = _bench(tmp_path, "--data", str(image_npz), "--defences", "none", "--attacks", "copycat",
                       "--epochs", "1", "--lr", "1e-6")
    assert result.exit_code == 2 and "underfits" in result.output and "accuracy on its own training set" in result.output
    assert "--min-train-accuracy" in result.output and "--epochs" in result.output  # the options to change
