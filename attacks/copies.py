"""The attacker's copies fitted to soft targets by minibatch Adam on cross-entropy (knowledge
distillation, Hinton et al. 2015; with one-hot targets, plain supervised training), several at once.

``train_copies`` fits one copy per prefix of the transfer set (the copies of an agreement-against-
queries curve) in one loop: the copies' parameters are stacked into one ``(copies, p)`` tensor and
each step runs every copy on its own minibatch with batched matrix products. Each copy takes exactly
the steps it would take alone: its initialisation and batch order from ``seed``, ``ceil(n_i /
batch_size)`` steps per epoch, and Adam (Kingma and Ba, ICLR 2015, Algorithm 1, PyTorch's defaults)
that moves a copy, and counts its step, only when that copy took a step.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from attacks.ensemble import Architecture

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def train_copies(X: np.ndarray, targets: np.ndarray, counts: Sequence[int], architecture: Architecture, *,
                 epochs: int = 150, lr: float = 1e-2, batch_size: int = 32, seed: int = 0) -> list[nn.Module]:
    """One copy of ``architecture`` (a sequence of linear layers and elementwise activations) per
    entry of ``counts``: copy ``i`` fitted to the first ``counts[i]`` rows of ``X`` and its soft
    ``targets``, starting from the initialisation that ``torch.manual_seed(seed)`` gives and
    shuffling with its own generator seeded ``seed``."""
    counts = [int(count) for count in counts]
    if not counts or min(counts) < 1 or max(counts) > len(X):
        raise ValueError(f"counts must lie in 1..{len(X)}: {counts}")
    torch.manual_seed(seed)
    skeleton = architecture.build(X.shape[1], targets.shape[1])
    flat = torch.cat([(p.t() if p.dim() == 2 else p).detach().flatten()
                      for p in skeleton.parameters()]).repeat(len(counts), 1)
    params = _leaves(flat, skeleton)
    adam = _MaskedAdam(flat, lr)
    inputs = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    soft = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    generators = [torch.Generator().manual_seed(seed) for _ in counts]
    for _ in range(epochs):
        rows, weights = _epoch(counts, generators, batch_size)
        # minus each copy's answers over its batch size: the loss is its mean cross-entropy
        answers = soft[rows] * (-weights / weights.sum(dim=2, keepdim=True).clamp(min=1))[..., None]
        for x, answer, update in zip(inputs[rows].unbind(1), answers.unbind(1), adam.epoch(weights[:, :, 0] > 0)):
            for name, layer in skeleton.named_children():
                x = (torch.baddbmm(params[f"{name}.bias"], x, params[f"{name}.weight"])
                     if isinstance(layer, nn.Linear) else layer(x))
            (answer * torch.log_softmax(x, dim=-1)).sum().backward()
            update(torch.cat([p.grad.flatten(1) for p in params.values()], dim=1))
            for p in params.values():
                p.grad = None
    copies = []
    for row in flat:
        model = copy.deepcopy(skeleton)
        model.load_state_dict({name: value.transpose(-2, -1)[0] if name.endswith("weight") else value[0, 0]
                               for name, value in _leaves(row[None], skeleton).items()})
        copies.append(model.eval())
    return copies


def _leaves(flat: torch.Tensor, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """The skeleton's parameters for every row of ``flat`` (``(copies, p)``: each parameter in
    ``parameters()`` order, weights transposed), as leaf tensors sharing its storage: weights
    ``(copies, in, out)`` and biases ``(copies, 1, out)``, ready for ``baddbmm``."""
    leaves, offset = {}, 0
    for name, parameter in skeleton.named_parameters():
        size = parameter.numel()
        shape = parameter.shape[::-1] if parameter.dim() == 2 else (1, size)
        leaves[name] = flat[:, offset:offset + size].view(len(flat), *shape).detach().requires_grad_(True)
        offset += size
    return leaves


def _epoch(counts: list[int], generators: list[torch.Generator], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's ``(copies, steps, batch_size)`` row indices and 0/1 weights: copy ``i``'s rows in a
    fresh random order cut into minibatches of ``batch_size`` (padding, and the steps a smaller
    copy does not take, have weight 0)."""
    width = -(-max(counts) // batch_size) * batch_size
    rows = torch.zeros(len(counts), width, dtype=torch.long)
    for i, (count, generator) in enumerate(zip(counts, generators)):
        rows[i, :count] = torch.randperm(count, generator=generator)
    weights = (torch.arange(width) < torch.tensor(counts)[:, None]).to(torch.float32)
    return rows.view(len(counts), -1, batch_size), weights.view(len(counts), -1, batch_size)


class _MaskedAdam:
    """Adam on the rows of a ``(copies, p)`` tensor, each row its own optimiser: a step moves, and
    counts for, only the rows that took it."""

    def __init__(self, flat: torch.Tensor, lr: float):
        self.flat, self.lr = flat, lr
        self.mean, self.square = torch.zeros_like(flat), torch.zeros_like(flat)
        self.steps = torch.zeros(len(flat), 1, dtype=torch.float64)

    def epoch(self, active: torch.Tensor) -> list[Callable[[torch.Tensor], None]]:
        """The updates of one epoch whose ``(copies, steps)`` mask says which rows take each step;
        an update takes the ``(copies, p)`` gradient (zero on the rows that do not step)."""
        steps = self.steps + active.cumsum(dim=1)
        self.steps = steps[:, -1:]
        steps = steps.clamp(min=1)
        step_size = torch.where(active, -self.lr / (1 - BETA1 ** steps), 0.0).float()
        correction = (1 - BETA2 ** steps).sqrt().float()
        return [functools.partial(self._update, *columns) for columns in zip(
            torch.where(active, 1 - BETA1, 0.0).T[..., None], torch.where(active, BETA2, 1.0).T[..., None],
            step_size.T[..., None], correction.T[..., None])]

    @torch.no_grad()
    def _update(self, weight: torch.Tensor, decay: torch.Tensor, step_size: torch.Tensor,
                correction: torch.Tensor, grad: torch.Tensor) -> None:
        self.mean.lerp_(grad, weight)
        self.square.mul_(decay).addcmul_(grad, grad, value=1 - BETA2)
        self.flat.addcdiv_(self.mean * step_size, self.square.sqrt().div_(correction).add_(EPS))
