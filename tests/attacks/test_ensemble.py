"""The vectorised ensemble trains each model on its own rows, exactly as if it were trained alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.ensemble import Architecture, TrainingConfig, random_halves, train_ensemble
from guard.models import make_model

QUICK = TrainingConfig(epochs=5)


def _equal_size_masks(n: int, models: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((models, n), dtype=bool)
    for row in masks:
        row[rng.permutation(n)[:size]] = True
    return masks


def test_each_model_is_the_model_trained_alone(digits):
    masks = _equal_size_masks(len(digits.y), 5, 400, seed=0)
    ensemble = train_ensemble(digits.X, digits.y, masks, digits.n_classes, config=QUICK, seed=1)
    alone = train_ensemble(digits.X, digits.y, masks[3:4], digits.n_classes, config=QUICK,
                           seed=ensemble.seeds[3:4])
    np.testing.assert_allclose(ensemble.predict_proba(digits.X)[3], alone.predict_proba(digits.X)[0],
                               atol=1e-6)
    assert not np.allclose(ensemble.predict_proba(digits.X)[2], alone.predict_proba(digits.X)[0], atol=1e-3)


def test_the_recorded_seeds_and_masks_reproduce_a_run(digits):
    masks = random_halves(len(digits.y), 4, seed=0)
    first = train_ensemble(digits.X, digits.y, masks, digits.n_classes, config=QUICK, seed=7)
    again = train_ensemble(digits.X, digits.y, first.masks, digits.n_classes, config=QUICK, seed=first.seeds)
    for name, value in first.params.items():
        assert value.shape[0] == 4
        assert (value == again.params[name]).all(), name


def test_models_only_see_their_own_rows(digits):
    low = digits.y < 5
    ensemble = train_ensemble(digits.X, digits.y, np.stack([low, ~low]), digits.n_classes,
                              architecture=Architecture("softmax"), config=QUICK)
    predicted = ensemble.predict_proba(digits.X).argmax(axis=2)
    assert (predicted[0] < 5).all() and (predicted[1] >= 5).all()


def test_models_generalise_like_a_single_model(digits):
    masks = random_halves(len(digits.y), 4, seed=1)
    ensemble = train_ensemble(digits.X, digits.y, masks, digits.n_classes, config=TrainingConfig(epochs=20))
    correct = ensemble.predict_proba(digits.X).argmax(axis=2) == digits.y
    held_out = [correct[i][~masks[i]].mean() for i in range(len(ensemble))]
    assert min(held_out) > 0.93
    assert all(correct[i][masks[i]].mean() > held_out[i] for i in range(len(ensemble)))


def test_random_halves_put_every_example_in_half_of_the_models():
    masks = random_halves(100, 8, seed=0)
    assert (masks.sum(axis=0) == 4).all()
    assert 30 < masks.sum(axis=1).min() and masks.sum(axis=1).max() < 70
    assert not (random_halves(100, 8, seed=1) == masks).all()


def test_rejects_masks_that_do_not_fit_the_pool(digits):
    with pytest.raises(ValueError):
        train_ensemble(digits.X, digits.y, np.ones((2, 10), dtype=bool), digits.n_classes, config=QUICK)
    with pytest.raises(ValueError):
        train_ensemble(digits.X, digits.y, np.ones((2, len(digits.y)), dtype=bool), digits.n_classes,
                       config=QUICK, seed=[1, 2, 3])


@pytest.mark.parametrize("kind, activation", [("softmax", "relu"), ("mlp", "relu"), ("mlp", "sigmoid"),
                                              ("mlp", "tanh")])
def test_the_attackers_architectures_are_the_guards_models(kind, activation):
    """An attacker's copy of a target (``Architecture``) is the model ``guard.models`` trains, weight
    for weight from the same seed."""
    torch.manual_seed(3)
    ours = make_model(kind, 5, 3, hidden=7, activation=activation)
    theirs = Architecture(kind, 7, activation).build(5, 3, seed=3)
    assert str(ours) == str(theirs)
    for mine, copy in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(mine, copy)
