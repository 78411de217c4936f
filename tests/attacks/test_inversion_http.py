"""The inversion attacks over HTTP: a FastAPI prediction app behind ``GuardMiddleware``, queried
in-process through ``HTTPTarget``."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import SVC

from attacks.inversion import InverseModel, MAPAttribute, MIFaceBlackBox
from attacks.targets import HTTPTarget, OutputFormat, OutputUnavailable
from benchmarks import datasets, models
from guard.serving import prediction_app
from benchmarks.tabular import sensitive_breast_cancer
from guard import GuardMiddleware, Policy

SECRET = "inversion-tests-secret-0123456789"


def guarded_target(model, n_features: int, n_classes: int, output: list[str]) -> HTTPTarget:
    app = prediction_app(lambda X: models.predict_proba(model, X), n_features)
    policy = Policy.from_dict({"secret": SECRET, "routes": {"/predict": {
        "probabilities": "/probabilities", "features": "/features", "output": output}}})
    return HTTPTarget("/predict", n_classes, client=GuardMiddleware(app, policy), batch_size=2048,
                      n_features=n_features)


@pytest.fixture(scope="module")
def evaluator(digits, digits_split):
    return SVC().fit(digits.X[digits_split.test], digits.y[digits_split.test]).predict


def test_mi_face_blackbox_over_http(digits_mlp, evaluator):
    with guarded_target(digits_mlp, 64, 10, []) as target:
        result = MIFaceBlackBox(alpha=200, gamma=0.01, directions=8).run(target, 64, evaluator=evaluator)
    assert result.metrics["identification_accuracy"] >= 0.6  # chance: 0.1
    assert result.queries == target.queries > 0


def test_mi_face_blackbox_over_http_says_a_label_only_api_is_unavailable(digits_mlp):
    with guarded_target(digits_mlp, 64, 10, ["label_only"]) as target:
        with pytest.raises(OutputUnavailable, match="labels"):
            MIFaceBlackBox(alpha=10).run(target, 64)
        assert target.queries <= 1  # at most the probe that found labels


def test_inverse_model_over_http_with_rounded_answers(digits, digits_split, digits_mlp, evaluator):
    victims = digits_split.train[:200]
    with guarded_target(digits_mlp, 64, 10, ["round:2"]) as target:
        observed = target.predict_proba(digits.X[victims])  # what the victims' own queries returned
        assert np.allclose(observed, np.round(observed, 2))
        result = InverseModel(epochs=60, output=OutputFormat(rounding=2)).run(
            target, digits.X[digits_split.aux], observed, digits.X[victims], digits.y[victims], evaluator)
    assert result.metrics["identification_accuracy"] >= 0.8
    assert result.metrics["reconstruction_error"] < 0.75 * result.metrics["baseline_reconstruction_error"]


def test_map_attribute_over_http():
    data = sensitive_breast_cancer()
    X, y = data.dataset.X, data.dataset.y
    part = datasets.split(data.dataset, seed=0)
    model = models.train_target("mlp", X[part.train], y[part.train], 2, seed=0, epochs=100)
    with guarded_target(model, X.shape[1], 2, ["round:1"]) as target:
        result = MAPAttribute(data.attribute, data.values).run(
            target, X[part.train], y[part.train], X[part.aux], y[part.aux], truth=X[part.train, data.attribute])
    assert result.metrics["accuracy"] > result.metrics["baseline_accuracy"] + 0.05
    assert result.metrics["precision"] > result.metrics["baseline_precision"] + 0.3
