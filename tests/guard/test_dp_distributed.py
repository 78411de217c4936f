"""guard.dp across two processes (Opacus DPDDP over gloo): the same accounting as one process."""
from __future__ import annotations

import pytest
import torch

from guard import models
from guard import dp

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order")


def test_two_processes_account_exactly_like_one(digits, digits_split):
    train = digits_split.train[:300]
    data = (digits.X[train], digits.y[train])
    test = (digits.X[digits_split.test[:300]], digits.y[digits_split.test[:300]])
    options = dict(target_epsilon=4.0, epochs=2, batch_size=50, lr=0.05, accountant="rdp", seed=0)
    torch.manual_seed(0)
    model = models.make_model("softmax", digits.n_features, digits.n_classes)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, single = dp.train_private(model, data, **options)
    finally:
        torch.set_num_threads(threads)
    trained, report = dp.train_private_distributed(2, model, data, **options)

    assert report.world_size == 2 and single.world_size == 1
    for field in ("noise_multiplier", "sample_rate", "steps", "history", "epsilon", "delta",
                  "expected_batch_size", "dataset_size"):
        assert getattr(report, field) == getattr(single, field), field
    assert report.epsilon <= 4.0
    # The processes trained one shared model: it learned, and it is not the initial one.
    assert dp.accuracy(trained, *dp.as_tensors(test)) > 0.5
    assert not torch.equal(trained[0].weight, model[0].weight)


def test_too_small_a_share_of_the_batch_is_refused_before_spawning(digits):
    model = models.make_model("softmax", digits.n_features, digits.n_classes)
    with pytest.raises(dp.DPConfigError, match="fewer than 16 examples a process"):
        dp.train_private_distributed(4, model, (digits.X[:300], digits.y[:300]), target_epsilon=2.0,
                                     epochs=1, batch_size=40)
