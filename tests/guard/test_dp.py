"""guard.dp: DP-SGD retraining, its privacy report, checkpoints and input checks."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guard import models
from guard import dp

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order"),
              pytest.mark.usefixtures("one_torch_thread")]
SMALL = dict(epochs=2, batch_size=40, lr=0.05, seed=0)



@pytest.fixture(scope="module")
def small(digits, digits_split):
    """400 training and 300 test rows of digits."""
    train, test = digits_split.train[:400], digits_split.test[:300]
    return (digits.X[train], digits.y[train]), (digits.X[test], digits.y[test]), digits.n_classes


def mlp(small) -> nn.Module:
    (X, _), _, k = small
    torch.manual_seed(0)
    return models.make_model("mlp", X.shape[1], k)


def rdp_epsilon(history: list, delta: float) -> float:
    """Epsilon of a composition of subsampled Gaussians, straight from the RDP analysis."""
    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 256)])
    curve = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=int(steps),
                                         orders=orders) for sigma, q, steps in history)
    return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=delta)[0])


def test_report_is_truthful_and_agrees_with_a_second_accountant(small, tmp_path):
    train, test, _ = small
    initial = mlp(small)
    model, report = dp.train_private(initial, train, target_epsilon=3.0, test_data=test, **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), mlp(small).parameters()))
    n_batches = math.ceil(400 / 40)
    assert report.dataset_size == 400 and report.delta == dp.default_delta(400) < 1 / 400
    assert report.sample_rate == pytest.approx(1 / n_batches)
    assert report.steps == 2 * n_batches and report.epochs == 2
    assert report.history == [[report.noise_multiplier, report.sample_rate, report.steps]]
    assert report.accountant == "prv" and report.max_grad_norm == 1.0
    assert report.sampling.startswith("Poisson") and report.adjacency == "add/remove one example"
    assert "every checkpoint" in report.scope and report.unit_of_privacy.startswith("one example")
    # Spent no more than the target, and not far below it (the noise was not over-provisioned).
    assert 2.9 <= report.epsilon <= 3.0
    # RDP is a valid but looser bound than PRV's: above it, within the usual gap.
    independent = rdp_epsilon(report.history, report.delta)
    assert report.epsilon - 0.02 <= independent <= 1.3 * report.epsilon
    # The private model learned something, and sits below the same model trained without DP.
    assert 0.5 < report.test_accuracy <= report.non_private_test_accuracy + 0.02
    assert report.non_private_test_accuracy > 0.85
    assert dp.accuracy(model, *dp.as_tensors(test)) == pytest.approx(report.test_accuracy)
    dp.save(model, report, tmp_path)
    assert dp.PrivacyReport.load(tmp_path / dp.REPORT_FILE) == report
    assert json.loads((tmp_path / dp.REPORT_FILE).read_text())["epsilon"] == report.epsilon
    restored = models.make_model("mlp", 64, 10)
    restored.load_state_dict(dp.load_state_dict(tmp_path / dp.MODEL_FILE))
    assert dp.accuracy(restored, *dp.as_tensors(test)) == pytest.approx(report.test_accuracy)


def test_rdp_accountant_matches_the_rdp_analysis(small):
    train, _, _ = small
    _, report = dp.train_private(mlp(small), train, target_epsilon=2.0, accountant="rdp",
                                 epochs=1, batch_size=40, seed=0)
    assert report.accountant == "rdp" and report.epsilon <= 2.0
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    curve = rdp_analysis.compute_rdp(q=report.sample_rate, noise_multiplier=report.noise_multiplier,
                                     steps=report.steps, orders=orders)
    expected = rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=report.delta)[0]
    assert report.epsilon == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", dp.GRAD_SAMPLE_MODES)
def test_each_grad_sample_mode_clips_per_example_gradients(mode):
    """Without noise, one DP-SGD step is -lr * sum_i clip(g_i, C) / expected batch (Abadi et al.
    2016, Algorithm 1), with g_i computed here one example at a time."""
    torch.manual_seed(0)
    X, y = torch.rand(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    clip, batch = 0.05, slice(0, 16)
    per_example, norms = [], []
    for i in range(16):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1]),
                                    list(model.parameters()))
        norms.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
        per_example.append([g * min(1.0, clip / norms[-1]) for g in grads])
    assert sum(norm > clip for norm in norms) >= 12  # clipping binds for most examples
    expected = [p - sum(e[j] for e in per_example) / 16 for j, p in enumerate(reference)]

    loader = DataLoader(TensorDataset(X, y), batch_size=16)  # expected batch 16 of 64
    dp_model, optimiser, criterion, _ = dp.make_private(
        dp.privacy_engine(), model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
        noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode)
    optimiser.zero_grad()
    criterion(dp_model(X[batch]), y[batch]).backward()
    optimiser.step()
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)


def test_resumed_run_spends_and_learns_exactly_what_one_continuous_run_does(small, tmp_path):
    train, _, _ = small
    options = dict(SMALL, epochs=3, target_epsilon=2.0, accountant="rdp")
    continuous, whole = dp.train_private(mlp(small), train, **options)

    def crash_after_first_epoch(epoch: int, epsilon: float) -> None:
        assert 0 < epsilon < 2.0  # the running total is reported, below the target mid-run
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dp.train_private(mlp(small), train, checkpoint_dir=tmp_path,
                         on_epoch=crash_after_first_epoch, **options)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epochs_done"] == 1 and state["history"][0][2] == whole.steps // 3
    resumed, report = dp.train_private(mlp(small), train, checkpoint_dir=tmp_path, resume=True,
                                       **options)
    assert report.history == whole.history and report.epsilon == whole.epsilon
    assert report.steps == whole.steps
    for a, b in zip(resumed.parameters(), continuous.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(dp.DPConfigError, match="batch_size"):
        dp.train_private(mlp(small), train, checkpoint_dir=tmp_path, resume=True,
                         **dict(options, batch_size=50))


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    torch.save({"weight": _Payload()}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        dp.load_state_dict(tmp_path / "model.pt")


def test_batchnorm_is_replaced_and_reported_or_refused(small):
    train, _, k = small
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, k))
    with pytest.raises(dp.UnsupportedLayersError, match="BatchNorm"):
        dp.train_private(net, train, target_epsilon=4.0, fix=False, **SMALL)
    fixed, changes = dp.prepare_model(net)
    assert changes == [("1: BatchNorm1d -> GroupNorm with 1 group(s) (pretrained running "
                        "statistics discarded)")]
    assert isinstance(net[1], nn.BatchNorm1d)  # the caller's model is left alone
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 1  # not one value a group
    model, report = dp.train_private(net, train, target_epsilon=4.0, accountant="rdp",
                                     epochs=1, batch_size=40, seed=0)
    assert report.model_changes == changes and isinstance(model[1], nn.GroupNorm)


@pytest.mark.parametrize("change, message", [
    (dict(target_epsilon=1e-3), "unreachable"),
    (dict(target_delta=1 / 400), "delta must lie"),
    (dict(accountant="gdp"), "unknown accountant"),
    (dict(grad_sample_mode="fast"), "unknown grad_sample_mode"),
    (dict(batch_size=400), "batch_size"),
    (dict(data=(np.zeros((0, 64)), np.zeros(0))), "empty"),
    (dict(data=(np.random.rand(50, 64), np.full(50, 3))), "single class"),
    (dict(data=(np.random.rand(50, 64), np.arange(50) % 12)), "labels must lie in 0..9"),
    (dict(data=(np.full((50, 64), np.nan), np.arange(50) % 10)), "NaN"),
])
def test_bad_input_is_refused_before_training(small, change, message):
    data = change.pop("data", small[0])
    model = mlp(small)
    before = [p.detach().clone() for p in model.parameters()]
    options = dict(SMALL, target_epsilon=2.0, on_epoch=_fail_if_called)
    with pytest.raises(dp.DPConfigError, match=message):
        dp.train_private(model, data, **{**options, **change})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _fail_if_called(epoch: int, epsilon: float) -> None:
    raise AssertionError("training started")


def test_noise_multiplier_is_opacus_search_computed_once_per_arguments(monkeypatch):
    from opacus.accountants.utils import get_noise_multiplier
    from guard.dp import checks

    arguments = (3.0, 1e-5, 0.05, 137, "rdp", checks.MAX_NOISE_MULTIPLIER)
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=137,
                                    accountant="rdp")
    checks.noise_multiplier_for.cache_clear()
    assert checks.noise_multiplier_for(*arguments) == expected
    monkeypatch.setattr(checks, "get_noise_multiplier", lambda **_: pytest.fail("searched twice"))
    assert checks.noise_multiplier_for(*arguments) == expected


def test_moving_average_of_the_weights(small):
    """``average=0`` keeps only the last iterate (the plain run's weights); a decay near 1 stays near the
    initial weights; both are post-processing of the same private run (same epsilon)."""
    train, _, _ = small
    last, report = dp.train_private(mlp(small), train, target_epsilon=2.0, **SMALL)
    same, averaged_report = dp.train_private(mlp(small), train, target_epsilon=2.0, average=0.0, **SMALL)
    slow, _ = dp.train_private(mlp(small), train, target_epsilon=2.0, average=0.9999, **SMALL)
    initial = mlp(small)
    for a, b, c, d in zip(last.parameters(), same.parameters(), slow.parameters(), initial.parameters()):
        assert torch.equal(a, b)
        assert (c - d).abs().max() < 0.01 * (a - d).abs().max()
    assert averaged_report.epsilon == report.epsilon
