"""guard.dp.audit: the empirical epsilon lower bounds, and that they catch a broken DP-SGD."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from guard import models
from guard import dp
from guard.dp import audit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = dict(target_epsilon=1.0, epochs=4, batch_size=40, lr=0.05)



@pytest.fixture(scope="module")
def train(digits, digits_split):
    rows = digits_split.train[:400]
    return digits.X[rows], digits.y[rows]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.make_model("mlp", 64, 10)


def test_one_run_bound_matches_randomised_response_when_every_guess_is_right():
    # pure DP: r right guesses of r have probability q^r, q = e^eps / (1 + e^eps) (Steinke et al., Thm 5.2)
    q = 0.05 ** (1 / 200)
    assert audit.one_run_epsilon(1000, 200, 200, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert audit.one_run_epsilon(1000, 200, 100, 0.0) == 0.0  # chance level proves nothing
    assert audit.one_run_epsilon(1000, 200, 200, 1e-4) < audit.one_run_epsilon(1000, 200, 200, 0.0)


def test_membership_bound_needs_separation_and_respects_confidence():
    rng = np.random.default_rng(0)
    is_member = np.arange(2000) < 1000
    assert audit.membership_epsilon(rng.normal(size=2000), is_member, 1e-5) == 0.0
    # perfect separation with two distinct scores (two thresholds, two bounds each: alpha / 4 per bound):
    # TPR >= (alpha / 4)^(1/1000) and FPR <= 1 - (alpha / 4)^(1/1000) with 1000 members and non-members
    tpr_low = (0.05 / 4) ** (1 / 1000)
    proved = audit.membership_epsilon(is_member + 0.0, is_member, 1e-5)
    assert proved == pytest.approx(math.log((tpr_low - 1e-5) / (1 - tpr_low)), rel=1e-6)


def broken_noise(self: DPOptimizer) -> None:
    for p in self.params:
        p.grad = p.summed_grad.view_as(p)  # the accountant still records the noise multiplier


def unclipped_last_layer(clip):
    def clip_and_accumulate(self: DPOptimizer) -> None:
        last = self.params[-2]  # the output layer's weight: its per-example gradients are not clipped
        raw = self._get_flat_grad_sample(last).clone()
        clip(self)
        last.summed_grad = raw.sum(dim=0)
    return clip_and_accumulate


INPUT = dict(kind="input", canaries=100, **{**RUN, "epochs": 30})  # memorising mislabelled rows takes longer


@pytest.mark.parametrize(("bug", "settings"), [("no noise", RUN), ("one layer unclipped", RUN), ("no noise", INPUT)],
                         ids=["no noise", "one layer unclipped", "no noise, input canaries"])
def test_audit_catches_a_broken_mechanism(train, monkeypatch, bug, settings):
    if bug == "no noise":
        monkeypatch.setattr(DPOptimizer, "add_noise", broken_noise)
    else:
        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped_last_layer(DPOptimizer.clip_and_accumulate))
    result = audit.audit(mlp(), train, seed=0, **settings)
    assert result.epsilon_lower_bound > result.epsilon, result


def test_correct_dp_sgd_is_never_refuted(train):
    for seed in range(3):
        result = audit.audit(mlp(), train, seed=seed, **RUN)
        assert 0 <= result.epsilon_lower_bound <= result.epsilon, result
        assert result.canaries == 1000 and result.delta == pytest.approx(0.01 * 0.05 / 2000)
    result = audit.audit(mlp(), train, seed=0, **INPUT)
    assert 0 <= result.epsilon_lower_bound <= result.epsilon and "input-space" in result.method, result


@pytest.mark.parametrize("accountant", dp.ACCOUNTANTS)
def test_dp_training_and_its_audit_emit_no_warnings(train, accountant):
    """Opacus's warnings the project has decided about are filtered where they arise; those about the
    reported epsilon become the report's notices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = dp.train_private(mlp(), train, accountant=accountant, seed=0, test_data=train,
                                     progress=True, on_epoch=lambda *_: None, **RUN)
        audit.audit(mlp(), train, accountant=accountant, seed=0, **RUN)
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in caught] == []
    assert all(notice.count("\n") == 0 for notice in report.notices)
