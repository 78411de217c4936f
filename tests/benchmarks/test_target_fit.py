"""Targets that fit users' data (issue 26): the recipe chosen by the data's kind, the search over learning
rate and epochs up to the train-accuracy floor, the floor on noisy tables, and the refusal that names the
options to change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import models


def survey(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small noisy survey, shaped like the Fair affairs data: ordinal codes and a flag, scaled to
    [0, 1] column by column, and a 5-level rating that the answers predict only in part."""
    rng = np.random.default_rng(seed)
    years = rng.choice([0.5, 2.5, 6, 9, 13, 16.5, 23], n)
    children = np.minimum(rng.poisson(years / 6), 5)
    religious = rng.integers(1, 5, n)
    columns = [rng.choice([17.5, 22, 27, 32, 37, 42], n), years, children, religious, rng.integers(1, 7, n),
               rng.integers(1, 7, n), rng.integers(0, 2, n)]
    rating = np.clip(np.round(4.3 - 0.05 * years - 0.08 * children + 0.1 * religious + rng.normal(0, 0.9, n)), 1, 5)
    X = np.column_stack(columns).astype(np.float64)
    X = (X - X.min(axis=0)) / (X.max(axis=0) - X.min(axis=0))
    return X.astype(np.float32), np.unique(rating, return_inverse=True)[1].astype(np.int64)


@pytest.fixture(scope="module")
def noisy():
    return survey(300)


def _fit_of(recipe: models.Recipe, X: np.ndarray, y: np.ndarray) -> float:
    torch.manual_seed(0)
    return models.accuracy(models.train_recipe(recipe.build(X.shape[1], int(y.max()) + 1), recipe, X, y, 0), X, y)


def test_the_recipe_follows_the_datas_kind():
    assert models.recipe("my_photos", "mlp", images=True) == models.FACES_RECIPES["mlp"]
    assert models.recipe("survey", "mlp").standardise and models.recipe("survey", "mlp").hidden == 256
    assert models.recipe("digits", "mlp", images=True) == models.Recipe("mlp")  # measured figures unchanged
    assert models.recipe("breast_cancer", "mlp") == models.Recipe("mlp")


def test_standardisation_is_folded_into_the_first_layer(noisy):
    X, y = noisy
    recipe = models.replace(models.recipe("survey", "mlp"), epochs=3)
    torch.manual_seed(0)
    model = models.train_recipe(recipe.build(X.shape[1], 5), recipe, X, y, 0)
    assert [type(layer) for layer in model] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    mean, std = X.mean(axis=0), X.std(axis=0)
    torch.manual_seed(0)
    plain = models.train(recipe.build(X.shape[1], 5), (X - mean) / std, y, epochs=3, lr=recipe.lr, seed=0)
    assert np.allclose(models.predict_proba(model, X), models.predict_proba(plain, (X - mean) / std), atol=1e-5)


def test_the_floor_on_a_noisy_table_is_halfway_to_what_its_records_allow(noisy):
    X, y = noisy
    floor = models.train_accuracy_floor(X, y, None, images=False)
    majority = np.bincount(y).max() / len(y)
    assert majority < floor < models.MIN_TRAIN_ACCURACY
    assert models.train_accuracy_floor(X, y, None, images=True) == models.MIN_TRAIN_ACCURACY
    assert models.train_accuracy_floor(X, y, 0.3, images=False) == 0.3
    duplicated = np.repeat(X[:1], 4, axis=0), np.array([0, 0, 1, 1])  # the same answers, two labels
    assert models.train_accuracy_floor(*duplicated, None, images=False) == 0.5  # halfway from 0.5 to 0.5


def test_the_search_meets_the_floor_where_the_old_defaults_failed(noisy):
    X, y = noisy
    floor = models.train_accuracy_floor(X, y, None, images=False)
    old = models.Recipe("mlp").sized(len(X))  # the default every user's table trained with before
    assert _fit_of(old, X, y) < floor
    slow = models.replace(models.recipe("survey", "mlp").sized(len(X)), lr=1e-3)  # as --lr 0.001 sets it
    assert _fit_of(slow, X, y) < floor  # the first try falls short: the search goes on to longer training
    model = models.fit(lambda: slow.build(X.shape[1], 5), slow, X, y, 0, floor, "the survey target",
                       fixed=frozenset({"lr"}))
    assert models.accuracy(model, X, y) >= floor
    assert [c.lr for c in models.candidates(slow, frozenset({"lr"}))] == [1e-3, 1e-3]  # the user's lr is kept


def test_a_target_no_try_can_fit_is_refused_naming_the_options(noisy):
    X, y = noisy
    recipe = models.Recipe("mlp", lr=1e-6, epochs=1)
    with pytest.raises(models.Underfit) as refused:
        models.fit(lambda: recipe.build(X.shape[1], 5), recipe, X, y, 0, 0.9, "the survey target",
                   fixed=frozenset({"lr", "epochs"}))
    message = str(refused.value)
    assert "\n" not in message and "floor 90%" in message and "lr 1e-06 x 1 epochs" in message
    for option in ("--min-train-accuracy", "--lr", "--epochs", "--hidden"):
        assert option in message
