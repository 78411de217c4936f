"""Non-private pretraining on public data before DP-SGD fine-tunes on the private data.

Data that needs no protection (published, licensed, or the user's own synthetic or consented rows)
can train a model without noise; DP-SGD then starts from those weights. This is how DP training
reaches usable accuracy in practice (Tramèr & Boneh, ICLR 2021, "Differentially Private Learning
Needs Better Features (or Much More Data)", §5; De et al. 2022, "Unlocking High-Accuracy
Differentially Private Image Classification through Scale", §4; Ganesh et al., ICML 2023, "Why Is
Public Pretraining Necessary for Private Model Training?"). The private data's guarantee is unchanged:
the pretrained weights are an input of the DP mechanism, as initial weights are. The public data
gets no guarantee at all, so only data whose every row may leak belongs there.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.dp.checks import DPConfigError, as_tensors, check_data
from guard.models import sized_epochs, train

PRETRAIN_EPOCHS = 60
PRETRAIN_BATCH_SIZE = 64
PRETRAIN_LR = 1e-2
"""Minibatch Adam as the bench's non-private targets train (``benchmarks.models.Recipe``'s defaults)."""


def pretrain(model: nn.Module, public_data: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor],
             seed: int) -> nn.Module:
    """``model`` trained without privacy on ``public_data = (X, y)`` (at least ``MIN_STEPS`` steps),
    left in training mode for DP-SGD; data the model cannot take is a :class:`DPConfigError`."""
    X, y = as_tensors(public_data)
    try:
        check_data(model, X, y)
    except DPConfigError as error:
        raise DPConfigError(f"public data: {error}") from None
    epochs = sized_epochs(PRETRAIN_EPOCHS, len(X), PRETRAIN_BATCH_SIZE)
    return train(model, X, y, epochs=epochs, lr=PRETRAIN_LR, batch_size=PRETRAIN_BATCH_SIZE, seed=seed).train()
