"""Many small classifiers trained at once as one vectorised ensemble: the attacker's shadow and
reference models (Shokri et al., S&P 2017, sec. IV; Carlini et al., S&P 2022, sec. IV).

The models' parameters are stacked (``torch.func.stack_module_state``) and one ``vmap`` of
``functional_call`` runs every model on its own minibatch in a single step. Each model trains on its
own subset of a shared pool (a boolean mask row) with the same optimiser as a single model (Adam on
cross-entropy). Adam is elementwise, so one optimiser over the stacked tensors is exactly one Adam per
model. Model ``i`` depends only on ``seeds[i]`` and ``masks[i]`` (its initialisation and its batch
order), so the seeds and masks recorded in the ``Ensemble`` reproduce a run.

These are the attacker's own architectures: they mirror the target's family by parameters
(``Architecture(kind, hidden)``) and never import the target zoo.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


@dataclass(frozen=True)
class Architecture:
    """``softmax``: multinomial logistic regression; ``mlp``: one hidden layer of ``hidden`` units
    and ``activation`` (relu, sigmoid or tanh)."""

    kind: str = "mlp"
    hidden: int = 64
    activation: str = "relu"

    def build(self, n_features: int, n_classes: int, seed: int | None = None) -> nn.Module:
        """A fresh model, initialised from ``seed`` (without touching the global generator) if given."""
        if seed is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return self.build(n_features, n_classes)
        if self.kind == "softmax":
            return nn.Sequential(nn.Linear(n_features, n_classes))
        if self.kind == "mlp":
            activation = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[self.activation]
            return nn.Sequential(nn.Linear(n_features, self.hidden), activation(),
                                 nn.Linear(self.hidden, n_classes))
        raise ValueError(f"unknown architecture {self.kind!r}: use 'softmax' or 'mlp'")


@dataclass(frozen=True)
class TrainingConfig:
    """Minibatch Adam on cross-entropy, the hyper-parameters the attacker assumes the target used."""

    epochs: int = 60
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 0.0


@dataclass
class Ensemble:
    """``len(seeds)`` trained models; model ``i`` was initialised from ``seeds[i]`` and trained on the
    pool rows where ``masks[i]`` is True."""

    architecture: Architecture
    config: TrainingConfig
    n_features: int
    n_classes: int
    params: dict[str, torch.Tensor]
    masks: np.ndarray
    seeds: np.ndarray

    def __len__(self) -> int:
        return len(self.seeds)

    def logits(self, X: np.ndarray) -> torch.Tensor:
        """``(models, n, k)`` logits of every model on the same inputs."""
        inputs = torch.as_tensor(np.asarray(X), dtype=torch.float32)
        forward = _forward(self.architecture.build(self.n_features, self.n_classes).to("meta"))
        with torch.no_grad():
            return vmap(forward, in_dims=(0, None))(self.params, inputs)

    def labels_each(self, X: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """``(models, ...)`` predicted labels of ``(models, ..., d)`` inputs, model ``i`` on its own
        inputs ``X[i]`` (e.g. each model's own step in a search), ``chunk`` rows per model at a time."""
        flat = np.asarray(X).reshape(len(self), -1, X.shape[-1])
        forward = vmap(_forward(self.architecture.build(self.n_features, self.n_classes).to("meta")))
        with torch.no_grad():
            labels = [forward(self.params, torch.from_numpy(np.ascontiguousarray(flat[:, start:start + chunk],
                                                                                 dtype=np.float32)))
                      .argmax(dim=-1).numpy() for start in range(0, flat.shape[1], chunk)]
        return np.concatenate(labels, axis=1).reshape(X.shape[:-1])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(models, n, k)`` softmax probabilities as float64."""
        return torch.softmax(self.logits(X).double(), dim=-1).numpy()


def random_halves(n: int, n_models: int, seed: int) -> np.ndarray:
    """``(n_models, n)`` masks where every example is IN for exactly half of the models (the balanced
    random halves of Carlini et al. 2022, sec. IV-B)."""
    ranks = np.random.default_rng(seed).random((n_models, n)).argsort(axis=0).argsort(axis=0)
    return ranks < n_models // 2


def train_ensemble(X: np.ndarray, y: np.ndarray, masks: np.ndarray, n_classes: int, *,
                   architecture: Architecture = Architecture(), config: TrainingConfig = TrainingConfig(),
                   seed: int | Sequence[int] = 0) -> Ensemble:
    """Train one model per row of ``masks`` (``(models, n)`` booleans over the pool ``X, y``);
    ``seed``: one seed per model, or one seed from which the models' seeds are drawn.

    Every epoch each model visits its own rows in its own random order, spread over
    ``ceil(max_i |mask_i| / batch_size)`` minibatches, so all models step together (a model trained
    alone with its seed and mask is the same model when the masks are all the same size).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != len(X) or not masks.any(axis=1).all():
        raise ValueError(f"masks must be (models, {len(X)}) booleans with at least one row per model")
    seeds = (np.random.default_rng(seed).integers(2**31 - 1, size=len(masks)) if np.ndim(seed) == 0
             else np.asarray(seed, dtype=np.int64))
    if len(seeds) != len(masks):
        raise ValueError(f"{len(seeds)} seeds for {len(masks)} models")
    inputs = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    targets = torch.as_tensor(np.asarray(y), dtype=torch.long)
    modules = [architecture.build(inputs.shape[1], n_classes, int(s)) for s in seeds]
    params, _ = stack_module_state(modules)
    forward = vmap(_forward(copy.deepcopy(modules[0]).to("meta")))
    optimiser = torch.optim.Adam(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    member = torch.as_tensor(masks)
    n_batches = -(-int(member.sum(dim=1).max()) // config.batch_size)
    for _ in range(config.epochs):
        index, weight = _epoch_batches(member, generators, n_batches)
        for rows, w in zip(index.unbind(1), weight.unbind(1)):
            optimiser.zero_grad()
            logits = forward(params, inputs[rows])
            losses = nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten(),
                                                 reduction="none").view_as(w)
            ((losses * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)).sum().backward()
            optimiser.step()
    return Ensemble(architecture, config, inputs.shape[1], n_classes,
                    {name: p.detach() for name, p in params.items()}, masks, seeds)


def _forward(skeleton: nn.Module):
    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(skeleton, params, (x,))

    return forward


def _epoch_batches(member: torch.Tensor, generators: list[torch.Generator],
                   n_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's ``(models, n_batches, slots)`` row indices and 0/1 weights: each model's rows in a
    fresh random order, the ``r``-th of them in minibatch ``r % n_batches`` (padding has weight 0)."""
    n_models, n = member.shape
    counts = member.sum(dim=1, keepdim=True)
    keys = torch.stack([torch.rand(n, generator=g) for g in generators])
    order = torch.where(member, keys, 2.0).argsort(dim=1)
    slots = -(-int(counts.max()) // n_batches)
    width = slots * n_batches
    order = nn.functional.pad(order, (0, max(width - n, 0)))[:, :width]
    valid = torch.arange(width) < counts
    shape = (n_models, slots, n_batches)
    return (order.view(shape).transpose(1, 2).contiguous(),
            valid.view(shape).transpose(1, 2).to(torch.float32).contiguous())
