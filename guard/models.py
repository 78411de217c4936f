"""The small PyTorch classifiers the ``guard`` command trains (``demo``, ``train-dp --model``):
softmax regression and one-hidden-layer MLPs, minibatch Adam, and their predictions as numpy."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

KINDS = ("softmax", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def model_from(factory: Callable[..., nn.Module], *arguments: int) -> nn.Module:
    """``factory(*arguments)`` (a user's ``module:function``, or ``lambda: ...`` for ``guard.dp.load``),
    which must be the network itself: ``TypeError`` otherwise, one line (say, for a factory that
    returns ``(model, optimiser)``)."""
    model = factory(*arguments)
    if not isinstance(model, nn.Module):
        name = getattr(factory, "__name__", type(factory).__name__)
        raise TypeError(f"the model factory {name} returned a {type(model).__name__}, not a "
                        "torch.nn.Module: return the network itself")
    return model


def make_model(kind: str, n_features: int, n_classes: int, hidden: int = 64,
               activation: str = "relu") -> nn.Module:
    """``softmax``: multinomial logistic regression; ``mlp``: one hidden layer of ``activation`` (the
    architectures the attacker's own copies have, ``attacks.ensemble.Architecture``; a test holds them
    equal)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {tuple(ACTIVATIONS)}")
    if kind == "softmax":
        return nn.Sequential(nn.Linear(n_features, n_classes))
    return nn.Sequential(nn.Linear(n_features, hidden), ACTIVATIONS[activation](),
                         nn.Linear(hidden, n_classes))


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


MIN_STEPS = 300
"""Fewest optimiser steps a non-private training run sized to its data takes (small data sets get more epochs)."""


def sized_epochs(epochs: int, n_train: int, batch_size: int) -> int:
    """``epochs``, or more where that many passes over ``n_train`` rows make fewer than ``MIN_STEPS`` steps."""
    return max(epochs, math.ceil(MIN_STEPS / math.ceil(n_train / batch_size)))


def train_target(kind: str, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0,
                 **train_options) -> nn.Module:
    """A freshly initialised model of ``kind`` trained on ``(X, y)``, seeded end to end."""
    torch.manual_seed(seed)
    model = make_model(kind, X.shape[1], n_classes)
    return train(model, X, y, seed=seed, **train_options)


def predict_proba(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a torch classifier on a numpy batch, as float64."""
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(X), dtype=torch.float32))
    return torch.softmax(logits.double(), dim=1).numpy()


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """The share of ``(X, y)`` the model labels right."""
    return float((predict_proba(model, X).argmax(axis=1) == y).mean())
