"""The target zoo: softmax regression and one-hidden-layer MLPs in PyTorch, how each is trained
(``Recipe``, chosen by the data's kind: bundled sets, users' images, users' tables), and the fit of a
target to its training set (``fit``: a short search over learning rate and epochs until it meets the
floor) before anything is measured on it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from guard.models import (ACTIVATIONS, KINDS, MIN_STEPS, accuracy, make_model,  # noqa: F401
                          predict_proba, sized_epochs, train, train_target)


class Underfit(ValueError):
    """The target does not fit its own training set: every attack's verdict on it would be meaningless."""


@dataclass(frozen=True)
class Recipe:
    """A target's architecture and training: ``kind`` (softmax or mlp), the MLP's ``hidden`` units
    and ``activation``, minibatch Adam's ``lr``, ``weight_decay``, ``batch_size`` and ``epochs``;
    ``standardise``: train on features standardised to mean 0 and variance 1 (the target still takes
    the data's [0, 1] features: the standardisation is folded into its first layer)."""

    kind: str
    hidden: int = 64
    activation: str = "relu"
    lr: float = 1e-2
    epochs: int = 60
    batch_size: int = 64
    weight_decay: float = 0.0
    standardise: bool = False

    def sized(self, n_train: int) -> Recipe:
        """At least ``MIN_STEPS`` optimiser steps on ``n_train`` records."""
        return replace(self, epochs=sized_epochs(self.epochs, n_train, self.batch_size))

    def build(self, n_features: int, n_classes: int) -> nn.Module:
        return make_model(self.kind, n_features, n_classes, self.hidden, self.activation)


FACES_RECIPES = {"softmax": Recipe("softmax", lr=1e-2, epochs=100),
                 "mlp": Recipe("mlp", hidden=3000, activation="sigmoid", lr=1e-3, epochs=80)}
"""Fredrikson et al. (CCS 2015, sec. 5.1)'s face recognisers: softmax regression and an MLP of 3000
sigmoid hidden units; these settings reach >= 90% held-out accuracy on 3 photos of each person."""


TABLE_RECIPES = {"softmax": Recipe("softmax", standardise=True),
                 "mlp": Recipe("mlp", hidden=256, lr=1e-2, standardise=True)}
"""Users' tables: features of any scale and coding (ordinal codes, counts, flags) standardised, and an
MLP wide enough to fit a noisy survey's training set within the search's few tries."""

BUNDLED_TARGETS = ("digits", "breast_cancer")
"""The bundled data sets whose targets train with the default ``Recipe`` (every figure measured on them)."""

MIN_TRAIN_ACCURACY = 0.8
"""The default floor on a target's training-set accuracy, lowered only for data that cannot support it
(``train_accuracy_floor``)."""


def recipe(dataset: str, kind: str, images: bool = False) -> Recipe:
    """The zoo's recipe for ``kind`` on ``dataset``: on the bundled faces and any user's images,
    Fredrikson's; on a user's table, ``TABLE_RECIPES``; on digits and breast cancer, the default."""
    if dataset in BUNDLED_TARGETS:
        return Recipe(kind)
    if (dataset.startswith("faces") or images) and kind in FACES_RECIPES:
        return FACES_RECIPES[kind]
    return TABLE_RECIPES.get(kind, Recipe(kind))


def train_recipe(model: nn.Module, recipe: Recipe, X: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    """``train`` with the recipe's optimiser settings (on standardised features if it says so)."""
    if not recipe.standardise:
        return train(model, X, y, epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                     batch_size=recipe.batch_size, seed=seed)
    mean, std = X.mean(axis=0), X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    train(model, (X - mean) / std, y, epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
          batch_size=recipe.batch_size, seed=seed)
    return fold_standardisation(model, mean, std)


def fold_standardisation(model: nn.Module, mean: np.ndarray, std: np.ndarray) -> nn.Module:
    """``model`` trained on ``(X - mean) / std`` rewritten to take ``X``: its first linear layer
    absorbs the affine map, so the architecture (what attacks assume) is unchanged."""
    first = next(layer for layer in model.modules() if isinstance(layer, nn.Linear))
    scale = torch.as_tensor(1.0 / std, dtype=first.weight.dtype)
    with torch.no_grad():
        first.weight.mul_(scale)
        first.bias.sub_(first.weight @ torch.as_tensor(mean, dtype=first.weight.dtype))
    return model


def train_accuracy_floor(X: np.ndarray, y: np.ndarray, floor: float | None, images: bool) -> float:
    """The training-set accuracy a target must reach: ``floor`` if given; else ``MIN_TRAIN_ACCURACY``,
    on a table lowered to halfway from the majority-class guess to the most any model can get right on
    ``(X, y)`` (records with the same features but different labels cap it) when that is less: a noisy
    survey's labels are fitted only by memorising them."""
    if floor is not None:
        return floor
    if images:
        return MIN_TRAIN_ACCURACY
    majority = np.bincount(y).max() / len(y)
    _, rows = np.unique(X, axis=0, return_inverse=True)
    counts = np.zeros((rows.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (rows.ravel(), y), 1)
    ceiling = counts.max(axis=1).sum() / len(y)
    return float(min(MIN_TRAIN_ACCURACY, (majority + ceiling) / 2))


def candidates(recipe: Recipe, fixed: frozenset[str] = frozenset()) -> list[Recipe]:
    """The recipes ``fit`` tries, in order: the recipe, a tenth of its learning rate, then three times
    its epochs at both; options in ``fixed`` (the user's ``--lr``, ``--epochs``) are never changed."""
    rates = (recipe.lr,) if "lr" in fixed else (recipe.lr, recipe.lr / 10)
    lengths = (recipe.epochs,) if "epochs" in fixed else (recipe.epochs, 3 * recipe.epochs)
    return [replace(recipe, lr=lr, epochs=epochs) for epochs in lengths for lr in rates]


def fit(build: Callable[[], nn.Module], recipe: Recipe, X: np.ndarray, y: np.ndarray, seed: int,
        floor: float, what: str, fixed: frozenset[str] = frozenset()) -> nn.Module:
    """The first of ``candidates(recipe, fixed)`` that, trained from ``build()`` (seeded), fits its
    training set ``(X, y)`` to at least ``floor``; ``Underfit`` naming the options to change if none does."""
    best = 0.0
    for tried in candidates(recipe, fixed):
        torch.manual_seed(seed)
        model = train_recipe(build(), tried, X, y, seed)
        reached = accuracy(model, X, y)
        if reached >= floor:
            return model
        best = max(best, reached)
    settings = ", ".join(f"lr {r.lr:g} x {r.epochs} epochs" for r in candidates(recipe, fixed))
    raise Underfit(f"{what} reaches at most {best:.1%} accuracy on its own training set (floor {floor:.0%}; "
                   f"tried {settings}): it underfits, so no attack on it means anything; lower the floor "
                   "(--min-train-accuracy), or set --lr, --epochs, --hidden or --activation")
