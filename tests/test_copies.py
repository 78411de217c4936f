"""The batched copy trainer takes, for each copy, the steps that copy would take alone under
PyTorch's Adam: same initialisation, same batch order, same parameters up to float rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.copies import train_copies
from attacks.extraction import architecture


def alone(X: np.ndarray, targets: np.ndarray, hidden: int | None, epochs: int, seed: int) -> torch.nn.Module:
    """The reference: one copy, ``torch.optim.Adam`` over ``randperm`` minibatches of 32."""
    torch.manual_seed(seed)
    model = architecture(hidden).build(X.shape[1], targets.shape[1])
    inputs, soft = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(32):
            optimiser.zero_grad()
            (-(soft[batch] * torch.log_softmax(model(inputs[batch]), dim=1)).sum(dim=1).mean()).backward()
            optimiser.step()
    return model


@pytest.mark.parametrize("hidden", [None, 16])
def test_each_batched_copy_is_the_copy_trained_alone(hidden):
    rng = np.random.default_rng(0)
    X = rng.random((150, 12))
    logits = X @ rng.normal(size=(12, 4)) * 3
    targets = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    counts = [7, 40, 75, 150]  # uneven last batches, and copies that sit out the later steps of an epoch
    copies = train_copies(X, targets, counts, architecture(hidden), epochs=12, seed=3)
    for count, copy in zip(counts, copies):
        reference = alone(X[:count], targets[:count], hidden, epochs=12, seed=3)
        for (name, value), expected in zip(copy.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=f"copy on {count} rows: {name}")
        assert not copy.training


def test_counts_outside_the_data_are_refused():
    with pytest.raises(ValueError):
        train_copies(np.zeros((5, 2)), np.full((5, 2), 0.5), [6], architecture(None))
