"""DP-SGD's cost: the benchmark MLP for one epoch without DP and with DP-SGD under each Opacus
grad-sample mode (epoch time and peak memory as ratios to non-private, medians of interleaved
repetitions; ``ghost`` is ghost clipping), and the test-accuracy cost of ``guard.dp.DP_RECIPE``
against the bench's non-DP targets at each epsilon, on digits (``accuracy``) and faces (``faces``), and
after pretraining on public data (``public``).
The recipe itself comes from ``python -m benchmarks.perf.dp_search``.

Run: ``python -m benchmarks.perf.dp [--quick] [--threads N] [--only overhead accuracy faces public]``.
The non-private baseline of ``overhead`` uses the same model, optimiser, Poisson data loader and
batch size; it only skips per-example gradients, clipping, noise and ``BatchMemoryManager``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from scipy import stats
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import datasets, models
from benchmarks.perf.attacks import Rows, print_table
from guard import dp

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
FACES_EPSILONS = (1.0, 8.0, 64.0)
FACES_RECIPE = dp.DPRecipe(sample_rate=0.5, epochs=300, lr=1e-2)
"""The best of ``python -m benchmarks.perf.dp_search --data faces`` (a search on the private faces: see there)."""
PUBLIC_EPSILONS = (1.0, 8.0)
PUBLIC_SHARES = (1.0, 0.2)
"""Shares of digits' auxiliary part (450 rows) the ``public`` section pretrains on."""
BATCH_SIZE = 128


def _digits() -> tuple[datasets.Dataset, datasets.Split]:
    data = datasets.load("digits")
    return data, datasets.split(data, seed=0)


def _trainer(mode: str | None, X: torch.Tensor, y: torch.Tensor):
    """A fresh MLP, Adam and Poisson loader; DP-SGD in ``mode``, or plain training for ``None``.
    Returns ``(model, epoch)`` where ``epoch()`` runs one pass over the data."""
    torch.manual_seed(0)
    model = models.make_model("mlp", X.shape[1], int(y.max()) + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH_SIZE,
                        generator=torch.Generator().manual_seed(0))
    engine = dp.privacy_engine()
    dp_model, dp_optimiser, criterion, dp_loader = dp.make_private(
        engine, model, optimiser, loader, noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode=mode or "hooks", noise_generator=torch.Generator().manual_seed(0))
    if mode is None:  # the same Poisson loader, without any of the private machinery
        dp_model.remove_hooks()
        return model, lambda: dp.run_epoch(model, optimiser, nn.CrossEntropyLoss(), dp_loader)

    def epoch() -> None:
        with BatchMemoryManager(data_loader=dp_loader, optimizer=dp_optimiser,
                                max_physical_batch_size=BATCH_SIZE) as batches:
            dp.run_epoch(dp_model, dp_optimiser, criterion, batches)

    return model, epoch


def _peak_bytes(epoch) -> int:
    """Peak of live bytes allocated by torch during one epoch (the profiler's allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        epoch()
    events = sorted((event.start_ns(), event.nbytes())
                    for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    return int(np.cumsum([nbytes for _, nbytes in events]).max(initial=0))


def _iqr(values: list[float]) -> str:
    quartiles = statistics.quantiles(values, n=4)
    return f"{quartiles[0]:.2f}-{quartiles[2]:.2f}"


def overhead(quick: bool) -> Rows:
    """Epoch time and peak memory of each grad-sample mode, as ratios to non-private training
    (time: median and interquartile range of the per-round ratios)."""
    data, parts = _digits()
    X, y = torch.as_tensor(data.X[parts.train]), torch.as_tensor(data.y[parts.train])
    modes = (None, *dp.GRAD_SAMPLE_MODES)
    trainers = {mode: _trainer(mode, X, y) for mode in modes}
    for _, epoch in trainers.values():
        epoch()  # warm-up
    times: dict[str | None, list[float]] = {mode: [] for mode in modes}
    for _ in range(5 if quick else 41):  # interleaved, so load on the machine hits every mode alike
        for mode, (_, epoch) in trainers.items():
            start = time.perf_counter()
            epoch()
            times[mode].append(time.perf_counter() - start)
    peaks = {mode: _peak_bytes(_trainer(mode, X, y)[1]) for mode in modes}
    reference = _trainer("hooks", X, y)
    reference[1]()
    rows = []
    for mode in modes:
        model, epoch = _trainer(mode, X, y)
        epoch()
        drift = max(float((a - b).detach().abs().max()) for a, b in
                    zip(model.parameters(), reference[0].parameters()))
        ratios = [t / base for t, base in zip(times[mode], times[None])]  # same round, same load
        rows.append({"mode": mode or "non-private",
                     "epoch_ms": 1e3 * statistics.median(times[mode]),
                     "time_ratio": statistics.median(ratios),
                     "ratio_iqr": _iqr(ratios),
                     "peak_kib": peaks[mode] / 1024, "memory_ratio": peaks[mode] / peaks[None],
                     "max_param_diff_vs_hooks": drift if mode else float("nan")})
    return rows


def _interval(values: list[float]) -> str:
    """Mean and 95% Student-t interval over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def _dp_cost(name: str, kind: str, epsilons: tuple[float, ...], seeds: range,
             recipe: dp.DPRecipe = dp.DP_RECIPE) -> Rows:
    """Test accuracy on split 0 of ``name`` of the bench's non-DP target (``models.recipe``) and of the
    same architecture trained with DP-SGD and ``recipe`` at each epsilon (PRV, default delta), per
    training seed (initial weights, sampling, noise), and the paired cost in points."""
    data = datasets.load(name)
    parts = datasets.split(data, seed=0)
    train = (data.X[parts.train], data.y[parts.train])
    X_test, y_test = data.X[parts.test], data.y[parts.test]
    plain = models.recipe(name, kind)
    non_dp = _non_private(data, kind, parts.train, parts.test, seeds)
    rows = [{"data": name, "model": kind, "recipe": "non-DP", "epsilon": "none",
             "test_accuracy": _interval(non_dp), "cost_points": "", "seeds": len(non_dp)}]
    for epsilon in epsilons:
        accuracies, reports = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            model = plain.build(data.n_features, data.n_classes)
            trained, report = dp.train_private(model, train, target_epsilon=epsilon, seed=seed,
                                               **recipe.options(len(parts.train)))
            accuracies.append(models.accuracy(trained, X_test, y_test))
            reports.append(report)
        rows.append({"data": name, "model": kind,
                     "recipe": f"q {recipe.sample_rate:g}, {recipe.epochs} epochs, lr {recipe.lr:g}",
                     "epsilon": f"{max(r.epsilon for r in reports):.3g}", "delta": reports[0].delta,
                     "noise_multiplier": reports[0].noise_multiplier, "test_accuracy": _interval(accuracies),
                     "cost_points": _interval([100 * (a - b) for a, b in zip(non_dp, accuracies)]),
                     "seeds": len(accuracies)})
    return rows


def _non_private(data: datasets.Dataset, kind: str, rows: np.ndarray, test: np.ndarray,
                 seeds: range) -> list[float]:
    """Test accuracy of the bench's non-DP target (``models.recipe``) trained on ``rows``, per seed."""
    plain = models.recipe(data.name, kind).sized(len(rows))
    accuracies = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = models.train_recipe(plain.build(data.n_features, data.n_classes), plain, data.X[rows],
                                    data.y[rows], seed)
        accuracies.append(models.accuracy(model, data.X[test], data.y[test]))
    return accuracies


def public_pretraining(quick: bool) -> Rows:
    """Digits MLP: DP_RECIPE fine-tuning a model pretrained on public data (``guard.dp.public``: the
    auxiliary part of split 0, whole or a fifth), against the bench's non-DP target (``cost_points``), the
    same pretrained model fine-tuned without DP (``like_for_like``), and that pretrained model alone
    (``private_adds``: what the private rows add under DP), paired per seed."""
    data, parts = _digits()
    train, test = (data.X[parts.train], data.y[parts.train]), (data.X[parts.test], data.y[parts.test])
    seeds = range(2 if quick else 6)
    non_dp = _non_private(data, "mlp", parts.train, parts.test, seeds)
    rows = [{"public_rows": 0, "recipe": "non-DP", "epsilon": "none", "test_accuracy": _interval(non_dp)}]
    for share in PUBLIC_SHARES:
        public = parts.aux[: round(share * len(parts.aux))]
        for epsilon in PUBLIC_EPSILONS:
            private, like, alone = [], [], []
            for seed in seeds:
                torch.manual_seed(seed)
                _, report = dp.train_private(models.recipe("digits", "mlp").build(data.n_features, data.n_classes),
                                             train, target_epsilon=epsilon, seed=seed, test_data=test,
                                             public_data=(data.X[public], data.y[public]),
                                             **dp.DP_RECIPE.options(len(parts.train)))
                private.append(report.test_accuracy)
                like.append(report.non_private_test_accuracy)
                alone.append(report.public_only_test_accuracy)
            if epsilon == PUBLIC_EPSILONS[0]:  # the same pretrained models at every epsilon
                rows.append({"public_rows": len(public), "recipe": "non-DP, public rows only", "epsilon": "none",
                             "test_accuracy": _interval(alone)})
            rows.append({"public_rows": len(public), "recipe": "public, then DP_RECIPE", "epsilon": epsilon,
                         "test_accuracy": _interval(private),
                         "cost_points": _interval([100 * (a - b) for a, b in zip(non_dp, private)]),
                         "like_for_like": _interval([100 * (a - b) for a, b in zip(like, private)]),
                         "private_adds": _interval([100 * (b - a) for a, b in zip(alone, private)])})
    return rows


def accuracy_vs_epsilon(quick: bool) -> Rows:
    """Digits MLP: the test-accuracy cost of DP-SGD with guard.dp.DP_RECIPE at each epsilon, against the
    bench's non-DP target, over training seeds on split 0 (mean and 95% t-interval)."""
    return _dp_cost("digits", "mlp", EPSILONS, range(1 if quick else 6))


def faces(quick: bool) -> Rows:
    """Faces (40 people, 7 training photos each): the test-accuracy cost of DP-SGD against the bench's non-DP
    targets; softmax with the faces search's best settings (``FACES_RECIPE``) at each epsilon, and with
    guard.dp.DP_RECIPE, the MLP's (one seed: a DP run of it costs ~30 CPU-seconds) at epsilon 8."""
    seeds = range(1 if quick else 3)
    return (_dp_cost("faces", "softmax", FACES_EPSILONS, seeds, FACES_RECIPE)
            + _dp_cost("faces", "softmax", (8.0,), seeds)[1:] + _dp_cost("faces", "mlp", (8.0,), range(1)))


SECTIONS = {"overhead": overhead, "accuracy": accuracy_vs_epsilon, "faces": faces, "public": public_pretraining}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="sections to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH_SIZE}")
    for name in args.only or ("overhead", "accuracy"):
        print_table(f"{name}: {SECTIONS[name].__doc__.splitlines()[0]}", SECTIONS[name](args.quick))


if __name__ == "__main__":
    main()
