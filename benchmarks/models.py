"""The target zoo: softmax regression and one-hidden-layer MLPs in PyTorch, how each is trained
(``Recipe``), and the check that a target fits its training set before anything is measured on it."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from guard.models import (ACTIVATIONS, KINDS, accuracy, make_model, predict_proba,  # noqa: F401
                          train, train_target)

MIN_STEPS = 300
"""Fewest optimiser steps a recipe sized to the data trains for (small data sets get more epochs)."""


class Underfit(ValueError):
    """The target does not fit its own training set: every attack's verdict on it would be meaningless."""


@dataclass(frozen=True)
class Recipe:
    """A target's architecture and training: ``kind`` (softmax or mlp), the MLP's ``hidden`` units
    and ``activation``, minibatch Adam's ``lr``, ``weight_decay``, ``batch_size`` and ``epochs``."""

    kind: str
    hidden: int = 64
    activation: str = "relu"
    lr: float = 1e-2
    epochs: int = 60
    batch_size: int = 64
    weight_decay: float = 0.0

    def sized(self, n_train: int) -> Recipe:
        """At least ``MIN_STEPS`` optimiser steps on ``n_train`` records."""
        batches = math.ceil(n_train / self.batch_size)
        return replace(self, epochs=max(self.epochs, math.ceil(MIN_STEPS / batches)))

    def build(self, n_features: int, n_classes: int) -> nn.Module:
        return make_model(self.kind, n_features, n_classes, self.hidden, self.activation)


FACES_RECIPES = {"softmax": Recipe("softmax", lr=1e-2, epochs=100),
                 "mlp": Recipe("mlp", hidden=3000, activation="sigmoid", lr=1e-3, epochs=80)}
"""Fredrikson et al. (CCS 2015, sec. 5.1)'s face recognisers: softmax regression and an MLP of 3000
sigmoid hidden units; these settings reach >= 90% held-out accuracy on 3 photos of each person."""


def recipe(dataset: str, kind: str) -> Recipe:
    """The zoo's recipe for ``kind`` on a bundled ``dataset`` (faces: Fredrikson's), else the default."""
    if dataset.startswith("faces") and kind in FACES_RECIPES:
        return FACES_RECIPES[kind]
    return Recipe(kind)


def train_recipe(model: nn.Module, recipe: Recipe, X: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    """``train`` with the recipe's optimiser settings."""
    return train(model, X, y, epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                 batch_size=recipe.batch_size, seed=seed)


def require_fit(model: nn.Module, X: np.ndarray, y: np.ndarray, minimum: float, what: str) -> float:
    """The model's accuracy on its own training set ``(X, y)``; ``Underfit`` below ``minimum``."""
    fit = accuracy(model, X, y)
    if fit < minimum:
        raise Underfit(f"{what} reaches only {fit:.1%} accuracy on its own training set (minimum "
                       f"{minimum:.0%}): it underfits, so no attack on it means anything; train it longer "
                       "(--epochs, --lr) or give it more capacity (--hidden)")
    return fit
