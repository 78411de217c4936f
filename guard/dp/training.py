"""DP-SGD training (Abadi et al. 2016, "Deep Learning with Differential Privacy", §3.1,
Algorithm 1) through Opacus, and the non-private baseline trained the same way."""
from __future__ import annotations

import copy
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guard.dp.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from guard.dp.checks import (
    MAX_NOISE_MULTIPLIER,
    as_tensors,
    check_data,
    check_options,
    check_shards,
    default_delta,
    noise_multiplier_for,
    prepare_model,
)
from guard.dp.public import pretrain
from guard.dp.report import PrivacyReport

#: The fastest correct mode on the benchmark MLP (``python -m benchmarks.perf.dp``).
DEFAULT_GRAD_SAMPLE_MODE = "ghost"
DEFAULT_BATCH_SIZE = 128

Optimiser = Literal["adam", "sgd"]


def train_private(
    model: nn.Module,
    train_data: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor],
    *,
    target_epsilon: float,
    epochs: int,
    target_delta: float | None = None,
    max_grad_norm: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    physical_batch_size: int | None = None,
    optimizer: Optimiser = "adam",
    lr: float = 1e-2,
    accountant: str = "prv",
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    fix: bool = True,
    test_data: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int | None = None,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    progress: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
    instrument: Callable[[DPOptimizer, float], None] | None = None,
    average: float | None = None,
    public_data: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
) -> tuple[nn.Module, PrivacyReport]:
    """Train ``model`` on ``train_data = (X, y)`` with DP-SGD to ``(target_epsilon, delta)``.

    Every input is checked before training starts (:class:`DPConfigError`). The noise multiplier is
    found for the exact number of logical steps, so the run spends at most ``target_epsilon``.
    ``batch_size`` is the expected logical (Poisson) batch; ``physical_batch_size`` bounds memory
    through ``BatchMemoryManager``. With ``checkpoint_dir`` the state (weights, optimiser, the
    accountant's history) is saved after every epoch; ``resume=True`` continues from it and reports
    the epsilon of the whole run. ``seed=None`` draws sampling and noise seeds from the OS; a fixed
    seed makes the run reproducible and the noise predictable to whoever knows it. ``test_data``
    adds the test accuracy of the private model and of the same architecture trained the same way
    without DP. Run inside an initialised ``torch.distributed`` group, it trains with ``DPDDP``.
    ``instrument(optimiser, sample_rate)`` is called once before training with Opacus's
    ``DPOptimizer``: an auditor's hook (:mod:`guard.dp.audit`). ``average`` returns an exponential
    moving average of the weights over the steps, with that decay (De et al. 2022, "Unlocking
    High-Accuracy Differentially Private Image Classification through Scale", §3.2): post-processing
    of the private iterates, it costs no privacy (on resume it restarts from the loaded weights).
    ``public_data = (X, y)``, rows that need no protection, pretrains the model without privacy
    before DP-SGD fine-tunes it (:mod:`guard.dp.public`); the non-private baseline starts from the
    same pretrained weights, so the accuracy comparison is like for like, and the report adds the
    pretrained model's own test accuracy (what the private rows add under DP is the difference).
    """
    X, y = as_tensors(train_data)
    check_data(model, X, y)
    delta = default_delta(len(X)) if target_delta is None else target_delta
    check_options(len(X), target_epsilon, delta, epochs, batch_size, accountant, grad_sample_mode,
                   optimizer)
    model, changes = prepare_model(copy.deepcopy(model), fix)  # the caller's model stays as it is
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    check_shards(batch_size, world)
    seed = secrets.randbits(62) if seed is None else seed
    if public_data is not None:  # DPDDP starts every process from rank 0's weights
        model = pretrain(model, public_data, _epoch_seed(seed, 0, "public"))
    initial = copy.deepcopy(model)

    sampling_rng, noise_rng = torch.Generator(), torch.Generator()
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, generator=sampling_rng)
    state = load_checkpoint(checkpoint_dir, model) if resume else None
    planned_steps = epochs * len(loader)
    if state is None:
        with warnings.catch_warnings():
            # the search tries noise multipliers far from the answer, whose RDP curves peak at the
            # largest or smallest order and whose PRV overflows for tiny noise (a large epsilon);
            # the reported epsilon is computed afresh (``_spent``), its warnings kept as notices
            warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
            warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
            noise_multiplier = noise_multiplier_for(target_epsilon, delta, 1 / len(loader),
                                                    planned_steps, accountant, max_noise_multiplier)
        start_epoch = 0
    else:
        check_resumable(state, len(X), batch_size, max_grad_norm, epochs, accountant, delta)
        noise_multiplier, start_epoch = state["noise_multiplier"], state["epochs_done"]
    optimiser = _optimiser(optimizer, model, lr)
    if state is not None and state["optimizer"] is not None:
        optimiser.load_state_dict(state["optimizer"])

    engine = privacy_engine(accountant)
    dp_model, dp_optimiser, criterion, dp_loader = make_private(
        engine, DPDDP(model) if world > 1 else model, optimiser, loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode, noise_generator=noise_rng)
    averaged = _MovingAverage(dp_optimiser, model, average) if average is not None else None
    if instrument is not None:
        instrument(dp_optimiser, 1 / len(loader))
    if state is not None:
        engine.accountant.history = [tuple(segment) for segment in state["history"]]

    bar = _progress_bar(epochs, start_epoch, progress and rank == 0)
    for epoch in range(start_epoch, epochs):
        sampling_rng.manual_seed(_epoch_seed(seed, epoch, "sampling", rank))
        noise_rng.manual_seed(_epoch_seed(seed, epoch, "noise"))
        if hasattr(dp_loader.batch_sampler, "set_epoch"):
            dp_loader.batch_sampler.set_epoch(epoch)
        physical = physical_batch_size or batch_size
        with BatchMemoryManager(data_loader=dp_loader, optimizer=dp_optimiser,
                                max_physical_batch_size=physical) as batches, warnings.catch_warnings():
            # ghost clipping's hooks fire on a first layer whose inputs need no gradient: harmless
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            run_epoch(dp_model, dp_optimiser, criterion, batches)
        if checkpoint_dir is not None and rank == 0:
            settings = dict(dataset_size=len(X), batch_size=batch_size, delta=delta,
                            max_grad_norm=max_grad_norm, epochs=epochs, accountant=accountant)
            save_checkpoint(Path(checkpoint_dir), model, dp_optimiser.original_optimizer,
                            engine.accountant.history, noise_multiplier, epoch + 1, settings)
        if bar is not None or on_epoch is not None:  # the accountant takes ~0.1-0.5 s a call
            spent, _ = _spent(engine, delta)
            if bar is not None:
                bar.set_postfix(epsilon=f"{spent:.3f}", refresh=False)
                bar.update(1)
            if on_epoch is not None:
                on_epoch(epoch + 1, spent)
    if bar is not None:
        bar.close()

    trained = copy.deepcopy(initial)
    trained.load_state_dict(model.state_dict())
    if averaged is not None:
        averaged.finish(trained)
    trained.eval()
    history = [list(segment) for segment in engine.accountant.history]
    epsilon, notices = _spent(engine, delta)
    report = PrivacyReport(
        epsilon=epsilon, delta=delta, target_epsilon=target_epsilon,
        accountant=accountant, noise_multiplier=float(noise_multiplier),
        max_grad_norm=max_grad_norm, sample_rate=1 / len(loader),
        expected_batch_size=len(X) / len(loader), steps=int(sum(s for *_, s in history)),
        epochs=epochs, dataset_size=len(X), history=history, grad_sample_mode=grad_sample_mode,
        world_size=world, model_changes=changes, notices=notices,
        public_rows=0 if public_data is None else len(public_data[0]))
    if test_data is not None and rank == 0:
        X_test, y_test = as_tensors(test_data)
        baseline = train_non_private(copy.deepcopy(initial), (X, y), epochs=epochs,
                                     batch_size=batch_size, optimizer=optimizer, lr=lr, seed=seed)
        report.test_accuracy = accuracy(trained, X_test, y_test)
        report.non_private_test_accuracy = accuracy(baseline, X_test, y_test)
        if public_data is not None:
            report.public_only_test_accuracy = accuracy(initial.eval(), X_test, y_test)
    return trained, report


def train_non_private(model: nn.Module, train_data: tuple, *, epochs: int, batch_size: int,
                      optimizer: Optimiser = "adam", lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """The baseline: the same optimiser, learning rate, batch size and epochs, without DP."""
    X, y = as_tensors(train_data)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimiser = _optimiser(optimizer, model, lr)
    for _ in range(epochs):
        run_epoch(model, optimiser, nn.CrossEntropyLoss(), loader)
    return model.eval()


def privacy_engine(accountant: str = "prv") -> PrivacyEngine:
    """An Opacus ``PrivacyEngine``; its secure-RNG warning is dropped because the report states
    the RNG in use (``noise_rng``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant=accountant)


def make_private(engine: PrivacyEngine, model: nn.Module, optimiser: torch.optim.Optimizer,
                 loader: DataLoader, *, noise_multiplier: float, max_grad_norm: float,
                 grad_sample_mode: str, noise_generator: torch.Generator | None = None) -> tuple:
    """``engine.make_private`` with Poisson sampling and cross-entropy, always returning
    ``(model, optimiser, criterion, loader)`` (ghost clipping brings its own criterion)."""
    private = engine.make_private(
        module=model, optimizer=optimiser, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
        grad_sample_mode=grad_sample_mode, noise_generator=noise_generator)
    if len(private) == 4:
        return private
    dp_model, dp_optimiser, dp_loader = private
    return dp_model, dp_optimiser, nn.CrossEntropyLoss(), dp_loader


class _MovingAverage:
    """An exponential moving average of ``model``'s trainable weights over the iterates of a run: the
    optimiser's step hook (which keeps the accountant's) folds in the weights before each logical step,
    :meth:`finish` the last ones."""

    def __init__(self, optimiser: DPOptimizer, model: nn.Module, decay: float) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.means = [p.detach().clone() for p in self.parameters]
        self.decay = decay
        recorded = optimiser.step_hook

        def step_hook(dp_optimiser: DPOptimizer) -> None:
            self.fold()
            if recorded is not None:
                recorded(dp_optimiser)

        optimiser.attach_step_hook(step_hook)

    def fold(self) -> None:
        with torch.no_grad():
            for mean, p in zip(self.means, self.parameters):
                mean.lerp_(p, 1 - self.decay)

    def finish(self, trained: nn.Module) -> None:
        """Fold in the final weights and write the average into ``trained``."""
        self.fold()
        with torch.no_grad():
            for target, mean in zip((p for p in trained.parameters() if p.requires_grad), self.means):
                target.copy_(mean)


def run_epoch(model: nn.Module, optimiser: torch.optim.Optimizer, criterion: Callable,
              batches) -> None:
    """One pass over ``batches``: the same loop serves private and non-private training."""
    model.train()
    for inputs, targets in batches:
        optimiser.zero_grad()
        criterion(model(inputs), targets).backward()
        optimiser.step()


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).float().mean())


def _spent(engine: PrivacyEngine, delta: float) -> tuple[float, list[str]]:
    """The accountant's epsilon, and its warnings as one line each: they concern the reported
    epsilon (e.g. an RDP bound at the largest order is looser than the analysis allows)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epsilon = float(engine.get_epsilon(delta))
    lines = (f"{w.category.__name__} from the {engine.accountant.mechanism()} accountant: "
             f"{str(w.message).splitlines()[0]}" for w in caught)
    return epsilon, list(dict.fromkeys(lines))


def _epoch_seed(seed: int, epoch: int, stream: str, rank: int = 0) -> int:
    """Independent, well-mixed seeds per (run, epoch, stream, rank): a resumed run draws fresh
    Poisson batches and noise exactly as the uninterrupted run would, never replaying old ones."""
    words = [seed, epoch, rank, *stream.encode()]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _optimiser(kind: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _progress_bar(epochs: int, start: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=start, desc="DP-SGD", unit="epoch")

