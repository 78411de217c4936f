"""Extraction over HTTP: a FastAPI prediction app behind ``GuardMiddleware``, attacked in-process
through ``HTTPTarget``: equation-solving steals the undefended softmax regression, is hurt by
``round:1``, and reports that it needs probabilities against ``label_only``, where copycat works."""
from __future__ import annotations

import pytest

from attacks.extraction import Copycat, EquationSolving
from attacks.targets import HTTPTarget, OutputUnavailable
from benchmarks import models
from guard.serving import prediction_app
from guard import GuardMiddleware, Policy

SECRET = "extraction-tests-secret-0123456789"


def guarded_api(model, output: list[str]) -> HTTPTarget:
    app = prediction_app(lambda X: models.predict_proba(model, X), 64)
    policy = Policy.from_dict({"secret": SECRET, "routes": {"/predict": {
        "probabilities": "/probabilities", "features": "/features", "output": output}}})
    return HTTPTarget("/predict", 10, client=GuardMiddleware(app, policy), batch_size=256, n_features=64)


@pytest.fixture(scope="module")
def evaluation(digits, digits_split, digits_softmax):
    return {"X_test": digits.X[digits_split.test], "y_test": digits.y[digits_split.test],
            "oracle": lambda X: models.predict_proba(digits_softmax, X).argmax(axis=1)}


def test_equation_solving_steals_the_undefended_api(digits_softmax, evaluation):
    with guarded_api(digits_softmax, []) as target:
        result = EquationSolving(curve_points=1).run(target, **evaluation)
        assert target.returns_probabilities and target.events["blocked_at"] is None
    assert result.queries == 585 + 1  # the unknowns, plus the probe that found probabilities
    assert result.metrics["exact"] == 1.0
    assert result.metrics["agreement_test"] >= 0.999 and result.metrics["agreement_uniform"] >= 0.999


def test_rounding_to_one_decimal_hurts_equation_solving(digits_softmax, evaluation):
    with guarded_api(digits_softmax, ["round:1"]) as target:
        result = EquationSolving(curve_points=1, max_iter=100).run(target, **evaluation)
    assert result.metrics["exact"] == 0.0
    assert result.metrics["agreement_test"] < 0.95


def test_label_only_stops_equation_solving_but_not_copycat(digits, digits_split, digits_softmax, evaluation):
    with guarded_api(digits_softmax, ["label_only"]) as target:
        with pytest.raises(OutputUnavailable, match="equation-solving needs probabilities"):
            EquationSolving().run(target, **evaluation)
        assert target.queries == 1  # the probe that found labels
        copied = Copycat(epochs=60, curve_points=1).run(target, aux=digits.X[digits_split.aux], **evaluation)
    assert copied.metrics["labels_only"] == 1.0 and copied.queries == len(digits_split.aux)
    assert copied.metrics["agreement_test"] >= 0.85
