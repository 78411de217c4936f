"""Membership inference in the LiRA game (the ``membership_game`` fixture): an MLP trained (60 epochs of Adam, no weight decay) on a
random half of digits; the candidates are the whole dataset, half of them members."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from attacks import ATTACKS
from attacks.membership import RMIA, LabelOnlyAttack, LiRA, ShadowModelAttack, ThresholdAttack, translations
from attacks.observations import scaled_logit
from attacks.targets import OutputFormat, OutputUnavailable, TorchTarget
from benchmarks import models

REFERENCES = 16


@pytest.fixture(scope="module")
def lira_online(digits, membership_game):
    model, member = membership_game
    return LiRA(REFERENCES).run(TorchTarget(model, 10), digits.X, digits.y, is_member=member)


def test_all_five_attacks_are_registered():
    assert {"threshold", "shadow", "lira", "rmia", "label-only"} <= set(ATTACKS)


def test_lira_is_several_times_the_threshold_attack_at_low_fpr(digits, membership_game, lira_online):
    model, member = membership_game
    target = TorchTarget(model, 10)
    threshold = ThresholdAttack("loss").run(target, digits.X, digits.y, is_member=member)
    offline = LiRA(REFERENCES, offline=True).run(target, digits.X, digits.y, is_member=member,
                                                  references=lira_online.artefacts["references"])
    base = max(threshold.metrics["tpr_at_1pct_fpr"], 0.01)  # never below chance (TPR = FPR)
    assert lira_online.metrics["tpr_at_1pct_fpr"] >= 3 * base
    assert offline.metrics["tpr_at_1pct_fpr"] >= 3 * base
    assert lira_online.metrics["auc"] > offline.metrics["auc"] > threshold.metrics["auc"]
    assert lira_online.queries == offline.queries == len(digits.y)
    fpr, tpr = lira_online.artefacts["fpr"], lira_online.artefacts["tpr"]
    assert fpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_lira_references_hold_every_candidate_in_half_of_the_models(digits, lira_online):
    masks = lira_online.artefacts["references"].masks
    assert masks.shape == (REFERENCES, len(digits.y)) and (masks.sum(axis=0) == REFERENCES // 2).all()


def test_lira_refuses_labels_only_and_reused_references_from_another_pool(digits, membership_game, lira_online):
    model, member = membership_game
    with pytest.raises(OutputUnavailable):
        LiRA().run(TorchTarget(model, 10, output=OutputFormat(label_only=True)), digits.X, digits.y)
    with pytest.raises(ValueError):
        LiRA().run(TorchTarget(model, 10), digits.X[:100], digits.y[:100],
                   references=lira_online.artefacts["references"])


def test_label_only_attack_beats_chance_against_labels_only(digits, membership_game):
    model, member = membership_game
    target = TorchTarget(model, 10, output=OutputFormat(label_only=True))
    result = LabelOnlyAttack("noise").run(target, digits.X, digits.y, is_member=member)
    scores = result.artefacts["scores"]
    assert mannwhitneyu(scores[member], scores[~member], alternative="greater").pvalue < 0.01
    assert result.queries == 64 * len(digits.y)


def test_shadow_model_attack_beats_chance(digits, membership_game):
    model, member = membership_game
    result = ShadowModelAttack(n_shadows=4).run(TorchTarget(model, 10), digits.X, digits.y,
                                                population=(digits.X, digits.y), is_member=member)
    scores = result.artefacts["scores"]
    assert mannwhitneyu(scores[member], scores[~member], alternative="greater").pvalue < 0.01
    assert result.artefacts["shadows"].masks.sum(axis=1).tolist() == [len(digits.y) // 2] * 4


def test_every_attack_is_near_chance_when_the_members_were_never_trained_on(digits):
    """The target trains on a third of digits; the candidates are the other two thirds, split at
    random into 'members' and 'non-members' it never saw."""
    order = np.random.default_rng(1).permutation(len(digits.y))
    trained, candidates = order[:600], order[600:]
    is_member = np.random.default_rng(2).random(len(candidates)) < 0.5
    model = models.train_target("mlp", digits.X[trained], digits.y[trained], 10, seed=1, epochs=60)
    X, y = digits.X[candidates], digits.y[candidates]
    full, labels = TorchTarget(model, 10), TorchTarget(model, 10, output=OutputFormat(label_only=True))
    lira = LiRA(8).run(full, X, y, population=(digits.X[trained], digits.y[trained]), is_member=is_member)
    results = [
        ThresholdAttack("loss").run(full, X, y, is_member=is_member),
        lira,
        LiRA(8, offline=True).run(full, X, y, population=(digits.X[trained], digits.y[trained]),
                                  is_member=is_member, references=lira.artefacts["references"]),
        ShadowModelAttack(n_shadows=2).run(full, X, y, population=(digits.X, digits.y), is_member=is_member),
        RMIA(8).run(full, X, y, population=(digits.X[trained], digits.y[trained]), is_member=is_member,
                    references=lira.artefacts["references"]),
        LabelOnlyAttack("noise").run(labels, X, y, is_member=is_member),
    ]
    for result in results:
        assert abs(result.metrics["auc"] - 0.5) < 0.03, (result.attack, result.metrics)


def test_threshold_attack_against_labels_only_is_the_gap_attack(digits, membership_game):
    model, member = membership_game
    result = ThresholdAttack("confidence").run(TorchTarget(model, 10, output=OutputFormat(label_only=True)),
                                               digits.X, digits.y, is_member=member)
    correct = model(torch.as_tensor(digits.X)).argmax(1).numpy() == digits.y
    np.testing.assert_array_equal(result.artefacts["scores"], correct.astype(float))


def test_boundary_distance_is_zero_when_misclassified_and_spends_the_queries_it_says(digits, membership_game):
    model, _ = membership_game
    target = TorchTarget(model, 10, output=OutputFormat(label_only=True))
    X, y = digits.X[:50], (digits.y[:50] + np.arange(50) % 2) % 10  # every other label wrong
    result = LabelOnlyAttack("boundary", n_directions=4, search_steps=6).run(target, X, y)
    scores = result.artefacts["scores"]
    assert (scores[1::2] == 0).all() and (scores[::2] > 0).all()
    assert result.queries == 50 * (4 * 6 + 1)


def test_scaled_logit_is_stable_near_certainty():
    p = np.array([[1 - 3e-20, 1e-20, 2e-20], [0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    phi = scaled_logit(p, np.array([0, 0, 0]), OutputFormat())
    np.testing.assert_allclose(phi[:2], [np.log(1 / 3e-20), 0.0], atol=1e-9)
    assert np.isfinite(phi).all() and phi[2] < -60
    rounded = scaled_logit(np.array([[1.0, 0.0]]), np.array([0]), OutputFormat(rounding=2))
    np.testing.assert_allclose(rounded, [np.log(1 / 0.005)])


def test_translations_shift_images_with_the_identity_first():
    image = np.zeros((1, 9))
    image[0, 4] = 1.0  # centre of a 3x3 image
    views = translations(image, (3, 3), 1)
    assert views.shape == (9, 1, 9)
    np.testing.assert_array_equal(views[0], image)
    assert sorted(int(view[0].argmax()) for view in views) == list(range(9))
