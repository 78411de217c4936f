"""RMIA (Zarifzadeh, Liu, Shokri, ICML 2024) on a small overfit target: an MLP trained for 100 epochs
on 150 digits; the candidates are those 150 and 150 records it never saw; the attacker's population
(its z samples, and the offline references' data) is 300 other records. The references train as the
target did (100 epochs)."""
from __future__ import annotations

import numpy as np
import pytest

from attacks.ensemble import TrainingConfig
from attacks.membership import RMIA, LiRA
from attacks.scoring import clopper_pearson
from attacks.targets import OutputFormat, OutputUnavailable, TorchTarget
from benchmarks import models

TRAINING = TrainingConfig(epochs=100)


@pytest.fixture(scope="module")
def game(digits):
    order = np.random.default_rng(5).permutation(len(digits.y))
    candidates, population = order[:300], order[300:600]
    is_member = np.arange(300) < 150
    model = models.train_target("mlp", digits.X[candidates[:150]], digits.y[candidates[:150]], 10, seed=5,
                                epochs=100)
    return (TorchTarget(model, 10), digits.X[candidates], digits.y[candidates], is_member,
            (digits.X[population], digits.y[population]))


@pytest.fixture(scope="module")
def online(game):
    target, X, y, is_member, population = game
    return RMIA(4, training=TRAINING, seed=1).run(target, X, y, population=population, is_member=is_member)


@pytest.fixture(scope="module")
def offline(game):
    target, X, y, is_member, population = game
    return RMIA(2, offline=True, training=TRAINING, seed=1).run(target, X, y, population=population, is_member=is_member)


def test_rmia_beats_chance_clearly_on_an_overfit_target(online, offline):
    for result in (online, offline):
        assert result.metrics["auc"] > 0.6, result.metrics
        low, _ = clopper_pearson(result.metrics["tpr_at_1pct_fpr"] * 150, 150)
        assert low > 0.01, result.metrics  # the TPR's interval lies above chance (TPR = FPR)


def test_online_references_hold_each_candidate_in_half_offline_references_none(game, online, offline):
    _, _, y, _, population = game
    online_masks, offline_masks = online.artefacts["references"].masks, offline.artefacts["references"].masks
    assert online_masks.shape == (4, len(y) + len(population[1]))
    assert (online_masks.sum(axis=0) == 2).all()
    assert not offline_masks[:, : len(y)].any() and offline_masks[:, len(y):].sum(axis=1).tolist() == [150, 150]
    assert "a" not in online.metrics and offline.metrics["a"] in np.round(np.arange(0, 1.01, 0.1), 1)
    assert online.queries == offline.queries == len(y) + len(population[1])


def test_score_is_the_fraction_of_z_whose_pairwise_ratio_exceeds_gamma(game, online):
    target, X, y, _, population = game
    for result, gamma in ((online, 1.0), (RMIA(4, gamma=2.0, seed=1).run(
            target, X, y, population=population, references=online.artefacts["references"]), 2.0)):
        pairwise = result.artefacts["ratios"][:, None] / result.artefacts["z_ratios"][None, :] > gamma
        np.testing.assert_allclose(result.artefacts["scores"], pairwise.mean(axis=1))


def test_offline_with_a_one_divides_by_the_out_models_mean(game, offline):
    target, X, y, _, population = game
    references = offline.artefacts["references"]
    result = RMIA(2, offline=True, a=1.0).run(target, X, y, population=population, references=references)
    mean_out = references.predict_proba(X)[:, np.arange(len(y)), y].mean(axis=0)
    np.testing.assert_allclose(result.artefacts["ratios"], target.predict_proba(X)[np.arange(len(y)), y] / mean_out)


def test_one_offline_reference_uses_the_default_a_and_online_shares_lira_references(game):
    target, X, y, is_member, population = game
    single = RMIA(1, offline=True, training=TRAINING, seed=2).run(target, X, y, population=population, is_member=is_member)
    assert single.metrics["a"] == RMIA.DEFAULT_A and single.metrics["auc"] > 0.6
    lira = LiRA(2, training=TRAINING, seed=3).run(target, X, y, is_member=is_member)  # references on halves of the candidates
    shared = RMIA(2).run(target, X, y, population=population, is_member=is_member,
                         references=lira.artefacts["references"])
    assert shared.metrics["auc"] > 0.6


def test_rmia_refuses_labels_only_and_a_missing_population(game):
    target, X, y, _, population = game
    with pytest.raises(OutputUnavailable):
        RMIA().run(TorchTarget(target.module, 10, output=OutputFormat(label_only=True)), X, y, population=population)
    with pytest.raises(ValueError, match="population"):
        RMIA(2, offline=True).run(target, X, y)
