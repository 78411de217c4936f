"""Membership inference over HTTP: a FastAPI prediction app behind ``GuardMiddleware`` answering
labels only, queried in-process through ``HTTPTarget``."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from attacks.membership import LabelOnlyAttack, LiRA, ThresholdAttack
from attacks.targets import HTTPTarget, OutputFormat, OutputUnavailable
from benchmarks import models
from guard.serving import prediction_app
from guard import GuardMiddleware, Policy

SECRET = "membership-tests-secret-0123456789"


def label_only_api(model) -> HTTPTarget:
    app = prediction_app(lambda X: models.predict_proba(model, X), 64)
    policy = Policy.from_dict({"secret": SECRET, "routes": {"/predict": {
        "probabilities": "/probabilities", "features": "/features", "output": ["label_only"]}}})
    return HTTPTarget("/predict", 10, client=GuardMiddleware(app, policy), batch_size=512, n_features=64)


def test_label_only_attack_beats_chance_through_the_guarded_api(digits, membership_game):
    model, member = membership_game
    with label_only_api(model) as target:
        result = LabelOnlyAttack("noise", n_noise=16).run(target, digits.X, digits.y, is_member=member)
        assert not target.returns_probabilities
        assert result.queries == 16 * len(digits.y)
    scores = result.artefacts["scores"]
    assert mannwhitneyu(scores[member], scores[~member], alternative="greater").pvalue < 0.01
    local = models.predict_proba(model, digits.X).argmax(axis=1) == digits.y
    gap = ThresholdAttack(output=OutputFormat(label_only=True))
    with label_only_api(model) as target:
        np.testing.assert_array_equal(gap.run(target, digits.X, digits.y).artefacts["scores"], local)


def test_lira_says_it_cannot_run_against_labels_only(digits, membership_game):
    model, _ = membership_game
    with label_only_api(model) as target, pytest.raises(OutputUnavailable):
        LiRA(n_references=2).run(target, digits.X[:10], digits.y[:10])
