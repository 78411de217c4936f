"""DP-SGD's own training settings, sized to the data: what ``guard train-dp`` and the bench's DP
targets train with unless told otherwise.

DP-SGD wants other settings than non-private training: many steps over expected batches of a tenth
of the data (the noise is divided by the batch; more epochs cost a larger noise multiplier, which
the longer run more than repays up to ~100 epochs). The settings were chosen by
``python -m benchmarks.perf.dp --only search``: DP-SGD at epsilon 8 on the digits MLP,
trained on the target part of split 0 and judged on its auxiliary part (never the test part).
That search read split 0's training part through 51 runs at epsilon 8 and its choice is not
private (basic composition bounds it by 51 x 8 for those rows: no meaningful guarantee); it is
spent once, and the recipe is a fixed public constant for every other data set and split. The clipping norm
stays at 1: 0.1 was no better on digits (0.964 against 0.962, one seed) and worse for the softmax
on breast cancer (0.866 against 0.901 test accuracy at epsilon 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DPRecipe:
    """Poisson ``sample_rate`` (the expected batch is ``sample_rate * n``, at least
    ``min_batch_size``), ``epochs``, Adam's ``lr`` and the clipping norm ``max_grad_norm``."""

    sample_rate: float = 0.1
    epochs: int = 100
    lr: float = 1e-2
    max_grad_norm: float = 1.0
    min_batch_size: int = 16

    def batch_size(self, n: int) -> int:
        """The expected logical batch for ``n`` training rows (always fewer than ``n``)."""
        return min(max(self.min_batch_size, math.ceil(self.sample_rate * n)), n - 1)

    def options(self, n: int) -> dict[str, float | int]:
        """Keyword arguments of :func:`guard.dp.train_private` for ``n`` training rows."""
        return {"batch_size": self.batch_size(n), "epochs": self.epochs, "lr": self.lr,
                "max_grad_norm": self.max_grad_norm}


DP_RECIPE = DPRecipe()
