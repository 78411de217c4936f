"""Inversion attacks: MI-Face's stopping rule and Process step pinned, and every attack beating its
baseline on bundled data (digits; breast cancer with a sensitive attribute)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import SVC

from attacks import ATTACKS
from attacks.inversion import (
    DenoisingAutoencoder,
    ImageFilter,
    InverseModel,
    MAPAttribute,
    MAPAttributeLabelOnly,
    MIFace,
    MIFaceBlackBox,
    descend,
)
from attacks.targets import CallableTarget, OutputFormat, OutputUnavailable, TorchTarget
from benchmarks import datasets, models
from benchmarks.tabular import sensitive_breast_cancer


def scripted(costs: list[list[float]]):
    """A cost function replaying ``costs[row][call]`` with gradient -1, so a step of 1 moves each
    row's x to its iteration number and the returned x says which iterate was chosen."""
    calls = np.zeros(len(costs), dtype=int)

    def cost_and_gradient(X: np.ndarray, rows: np.ndarray):
        cost = np.array([costs[row][calls[row]] for row in rows])
        calls[rows] += 1
        return cost, -np.ones_like(X)

    return cost_and_gradient


def test_stopping_rule_waits_for_no_progress_over_beta_costs_and_returns_the_best_iterate():
    # row 0: rises at i=3 (0.85) but stays below the max of the last 3 costs (1.0): goes on;
    #        at i=5, 0.9 >= max(0.82, 0.85, 0.8): stops; the best iterate is i=2 (0.8).
    # row 1: falls to gamma at i=2 and stops there.
    costs = [[1.0, 0.9, 0.8, 0.85, 0.82, 0.9, 0.1, 0.1], [1.0, 0.5, 0.05, 0.01, 0.01, 0.01, 0.01, 0.01]]
    result = descend(scripted(costs), np.zeros((2, 1)), alpha=100, beta=3, gamma=0.05, step=1.0,
                     process=lambda X: X)
    assert result.iterations.tolist() == [5, 2]
    assert result.x[:, 0].tolist() == [2.0, 2.0]
    assert result.cost.tolist() == [0.8, 0.05]


def test_stopping_rule_stops_after_alpha_iterations_and_not_while_costs_fall():
    falling = [list(np.linspace(1.0, 0.5, 20))]
    result = descend(scripted(falling), np.zeros((1, 1)), alpha=7, beta=2, gamma=0.0, step=1.0,
                     process=lambda X: X)
    assert result.iterations.tolist() == [7]
    assert result.x[0, 0] == 7.0 and result.cost[0] == pytest.approx(falling[0][7])


def test_image_filter_denoises_sharpens_and_stays_in_the_pixel_box():
    speck = np.zeros((1, 8, 8))
    speck[0, 4, 4] = 1.0
    denoised = ImageFilter((8, 8), denoise=0.7, sharpen=0.0)(speck.reshape(1, -1))
    assert denoised.max() < 0.5 and denoised.reshape(8, 8)[4, 3] > 0  # the speck is spread out
    edge = np.tile(np.r_[np.full(4, 0.3), np.full(4, 0.7)], (8, 1)).reshape(1, -1)
    soft = ImageFilter((8, 8), denoise=0.5, sharpen=0.0)(edge).reshape(8, 8)
    sharp = ImageFilter((8, 8), denoise=0.5, sharpen=1.0)(edge).reshape(8, 8)
    assert sharp[4, 4] - sharp[4, 3] > soft[4, 4] - soft[4, 3]  # more contrast across the edge
    noisy = np.random.default_rng(0).uniform(-1, 2, size=(5, 64))
    out = ImageFilter((8, 8))(noisy)
    assert out.shape == (5, 64) and out.min() >= 0.0 and out.max() <= 1.0


@pytest.fixture(scope="module")
def evaluator(digits, digits_split):
    """The independent evaluation classifier: an RBF SVM trained on the held-out test split."""
    return SVC().fit(digits.X[digits_split.test], digits.y[digits_split.test]).predict


@pytest.fixture(scope="module")
def class_means(digits, digits_split):
    X, y = digits.X[digits_split.train], digits.y[digits_split.train]
    return np.stack([X[y == label].mean(axis=0) for label in range(digits.n_classes)])


def test_registry_names_the_inversion_attacks():
    for name, cls in [("mi-face", MIFace), ("mi-face-blackbox", MIFaceBlackBox),
                      ("inverse-model", InverseModel), ("map-attribute", MAPAttribute)]:
        assert ATTACKS[name] is cls


def test_mi_face_whitebox_reconstructions_are_identified(digits_mlp, evaluator, class_means):
    result = MIFace(alpha=500).run(TorchTarget(digits_mlp, 10), 64, references=class_means, evaluator=evaluator)
    assert result.metrics["identification_accuracy"] >= 0.6  # chance: 0.1
    assert result.metrics["iterations"] < 500  # the stopping rule ended the descent
    assert result.metrics["cost"] < 0.05
    assert result.artefacts["reconstructions"].shape == (10, 64)


def test_mi_face_applies_the_process_step_after_every_step(digits_mlp):
    capped = MIFace(alpha=50, process=lambda X: np.clip(X, 0.0, 0.25)).run(TorchTarget(digits_mlp, 10), 64)
    free = MIFace(alpha=50).run(TorchTarget(digits_mlp, 10), 64)
    assert capped.artefacts["reconstructions"].max() <= 0.25 < free.artefacts["reconstructions"].max()


def test_denoising_autoencoder_process_denoises_and_pulls_mi_face_towards_the_data(
        digits, digits_split, digits_mlp, evaluator, class_means):
    dae = DenoisingAutoencoder(seed=0).fit(digits.X[digits_split.aux])
    clean = digits.X[digits_split.test]
    noisy = np.clip(clean + 0.3 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1)
    dae.strength = 1.0
    assert np.mean((dae(noisy) - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)
    dae.strength = 0.1
    target = TorchTarget(digits_mlp, 10)
    plain = MIFace(alpha=500).run(target, 64, references=class_means, evaluator=evaluator)
    learnt = MIFace(alpha=500, process=dae).run(target, 64, references=class_means, evaluator=evaluator)
    assert learnt.metrics["reconstruction_error"] < 0.6 * plain.metrics["reconstruction_error"]
    assert learnt.metrics["identification_accuracy"] >= 0.6


def test_mi_face_blackbox_estimates_gradients_from_confidences(digits_mlp, evaluator, class_means):
    target = CallableTarget(lambda X: models.predict_proba(digits_mlp, X), 10)
    result = MIFaceBlackBox(alpha=300, directions=16).run(target, 64, references=class_means, evaluator=evaluator)
    assert result.metrics["identification_accuracy"] >= 0.6
    assert result.queries == target.queries > 0
    assert result.queries % (2 * 16 + 1) == 0  # one batch of (iterate + 2 x 16 probes) per row and step


def test_mi_face_variants_refuse_targets_that_cannot_serve_them(digits_mlp):
    target = CallableTarget(lambda X: models.predict_proba(digits_mlp, X), 10, output=OutputFormat(label_only=True))
    with pytest.raises(OutputUnavailable, match="labels only"):
        MIFaceBlackBox(alpha=10).run(target, 64)
    with pytest.raises(OutputUnavailable, match="white-box"):
        MIFace(alpha=10).run(CallableTarget(lambda X: models.predict_proba(digits_mlp, X), 10), 64)
    assert target.queries == 0


def test_inverse_model_trained_on_aux_data_reconstructs_members(digits, digits_split, digits_mlp, evaluator):
    victims = digits_split.train[:200]
    target = TorchTarget(digits_mlp, 10, output=OutputFormat(rounding=2))
    observed = target.predict_proba(digits.X[victims])
    queries = target.queries
    result = InverseModel(epochs=60, output=OutputFormat(rounding=2)).run(
        target, digits.X[digits_split.aux], observed, digits.X[victims], digits.y[victims], evaluator)
    assert result.queries == target.queries - queries == len(digits_split.aux)
    assert result.metrics["identification_accuracy"] >= 0.8
    assert result.metrics["reconstruction_error"] < 0.75 * result.metrics["baseline_reconstruction_error"]


def test_inverse_model_inverts_a_split_networks_representation_better_than_its_output(
        digits, digits_split, digits_mlp, evaluator):
    def representation(X: np.ndarray) -> np.ndarray:  # the hidden layer a split network's server sees
        with torch.no_grad():
            return digits_mlp[:2](torch.as_tensor(X, dtype=torch.float32)).numpy()

    victims = digits_split.train[:200]
    target = TorchTarget(digits_mlp, 10)
    split = InverseModel(epochs=60, representation=representation).run(
        target, digits.X[digits_split.aux], representation(digits.X[victims]), digits.X[victims])
    output = InverseModel(epochs=60).run(
        target, digits.X[digits_split.aux], target.predict_proba(digits.X[victims]), digits.X[victims])
    assert split.queries == 0
    assert split.metrics["reconstruction_error"] < 0.6 * output.metrics["reconstruction_error"]


@pytest.fixture(scope="module")
def sensitive():
    data = sensitive_breast_cancer()
    part = datasets.split(data.dataset, seed=0)
    model = models.train_target("mlp", data.dataset.X[part.train], data.dataset.y[part.train], 2, seed=0, epochs=100)
    return data, part, model


def test_sensitive_dataset_keeps_the_attribute_as_a_minority_feature(sensitive):
    data, _, _ = sensitive
    codes = data.codes
    assert set(np.unique(data.dataset.X[:, data.attribute])) == set(data.values.tolist())
    assert 0.2 < codes.mean() < 0.4  # the positive level is the minority
    assert data.dataset.X.min() >= 0 and data.dataset.X.max() <= 1


def test_map_attribute_beats_the_prior_for_members_and_non_members(sensitive):
    data, part, model = sensitive
    X, y = data.dataset.X, data.dataset.y
    records = np.concatenate([part.train, part.test])
    members = np.r_[np.ones(len(part.train), bool), np.zeros(len(part.test), bool)]
    hidden = X[records].copy()
    hidden[:, data.attribute] = -1.0  # the attacker does not know it
    target = CallableTarget(lambda batch: models.predict_proba(model, batch), 2)
    attack = MAPAttributeLabelOnly(data.attribute, data.values)
    result = attack.run(target, hidden, y[records], X[part.aux], y[part.aux],
                        truth=X[records, data.attribute], members=members)
    for group in ("members_", "nonmembers_"):
        assert result.metrics[group + "accuracy"] > result.metrics[group + "baseline_accuracy"] + 0.05
        assert result.metrics[group + "precision"] > result.metrics[group + "baseline_precision"] + 0.3
    assert result.queries == len(part.aux) + 2 * len(records)
    confidence = MAPAttribute(data.attribute, data.values).run(target, hidden, y[records], X[part.aux], y[part.aux],
                                                               truth=X[records, data.attribute], members=members)
    assert confidence.queries == 2 * len(records)
    print({k: round(v, 3) for k, v in confidence.metrics.items() if "accuracy" in k or "precision" in k})
    assert confidence.metrics["accuracy"] > confidence.metrics["baseline_accuracy"] + 0.05
    label_only = CallableTarget(target.fn, 2, output=OutputFormat(label_only=True))
    again = attack.run(label_only, hidden, y[records], X[part.aux], y[part.aux])
    np.testing.assert_array_equal(again.artefacts["guesses"], result.artefacts["guesses"])


def test_map_attribute_weighs_the_prior_by_the_confusion_matrix():
    # the model answers the attribute itself; aux data: prior P(v=1) = 0.4, and the error model
    # P(y=1 | answer 0) = 1/6, P(y=1 | answer 1) = 2/4
    target = CallableTarget(lambda X: np.eye(2)[(X[:, 0] > 0.5).astype(int)], 2)
    aux_X = np.array([[0.0]] * 6 + [[1.0]] * 4)
    aux_y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    result = MAPAttributeLabelOnly(0, np.array([0.0, 1.0]), smoothing=0.0).run(
        target, np.zeros((2, 1)), np.array([1, 0]), aux_X, aux_y)
    # y=1: 0.6 * 1/6 (v=0) < 0.4 * 2/4 (v=1); y=0: 0.6 * 5/6 (v=0) > 0.4 * 2/4 (v=1)
    assert result.artefacts["guesses"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(result.artefacts["posterior"], [[1 / 3, 2 / 3], [5 / 7, 2 / 7]])
