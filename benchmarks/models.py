"""The target zoo: softmax regression and one-hidden-layer MLPs in PyTorch, how each is trained
(``Recipe``), and the check that a target fits its training set before anything is measured on it."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from attacks.ensemble import Architecture

KINDS = ("softmax", "mlp")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
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


def make_model(kind: str, n_features: int, n_classes: int, hidden: int = 64,
               activation: str = "relu") -> nn.Module:
    """``softmax``: multinomial logistic regression; ``mlp``: one hidden layer of ``activation``
    (the same architectures the attacker's own copies use, ``attacks.ensemble.Architecture``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {ACTIVATIONS}")
    return Architecture(kind, hidden, activation).build(n_features, n_classes)


def train(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Minibatch Adam on cross-entropy; deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.as_tensor(X, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.long)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimiser.step()
    return model.eval()


def train_recipe(model: nn.Module, recipe: Recipe, X: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    """``train`` with the recipe's optimiser settings."""
    return train(model, X, y, epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                 batch_size=recipe.batch_size, seed=seed)


def train_target(kind: str, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0,
                 **train_options) -> nn.Module:
    """A freshly initialised model of ``kind`` trained on ``(X, y)``, seeded end to end."""
    torch.manual_seed(seed)
    model = make_model(kind, X.shape[1], n_classes)
    return train(model, X, y, seed=seed, **train_options)


def require_fit(model: nn.Module, X: np.ndarray, y: np.ndarray, minimum: float, what: str) -> float:
    """The model's accuracy on its own training set ``(X, y)``; ``Underfit`` below ``minimum``."""
    fit = accuracy(model, X, y)
    if fit < minimum:
        raise Underfit(f"{what} reaches only {fit:.1%} accuracy on its own training set (minimum "
                       f"{minimum:.0%}): it underfits, so no attack on it means anything; train it longer "
                       "(--epochs, --lr) or give it more capacity (--hidden)")
    return fit


def predict_proba(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a torch classifier on a numpy batch, as float64."""
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(X), dtype=torch.float32))
    return torch.softmax(logits.double(), dim=1).numpy()


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(model, X).argmax(axis=1) == y).mean())
