"""DP-SGD cost and utility on digits: the benchmark MLP for one epoch without DP and with DP-SGD
under each Opacus grad-sample mode (epoch time and peak memory as ratios to non-private, medians
of interleaved repetitions), test accuracy against epsilon with the DP recipe, and the search that
chose the recipe (``search``, run only when named: it trains 51 models).

Run: ``python -m benchmarks.perf.dp [--quick] [--threads N] [--only overhead accuracy search]``.
The non-private baseline uses the same model, optimiser, Poisson data loader and batch size; it
only skips per-example gradients, clipping, noise and ``BatchMemoryManager``.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import datasets, models
from benchmarks.perf.attacks import Rows, print_table
from guard import dp

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
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


def accuracy_vs_epsilon(quick: bool) -> Rows:
    """Test accuracy of DP-SGD with ``guard.dp.DP_RECIPE`` at each epsilon (PRV, default delta),
    beside the non-DP recipe of the bench's undefended target (``models.recipe``) on the same rows."""
    data, parts = _digits()
    train = (data.X[parts.train], data.y[parts.train])
    X_test, y_test = data.X[parts.test], data.y[parts.test]
    seeds = range(1 if quick else 3)
    plain = models.recipe("digits", "mlp").sized(len(parts.train))
    non_dp = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = models.make_model("mlp", data.n_features, data.n_classes)
        non_dp.append(models.accuracy(models.train_recipe(model, plain, *train, seed), X_test, y_test))
    rows = []
    for epsilon in EPSILONS:
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = models.make_model("mlp", data.n_features, data.n_classes)
            trained, report = dp.train_private(model, train, target_epsilon=epsilon, seed=seed,
                                               **dp.DP_RECIPE.options(len(parts.train)))
            runs.append((report, models.accuracy(trained, X_test, y_test)))
        accuracy = statistics.mean(a for _, a in runs)
        rows.append({"target_epsilon": epsilon, "epsilon_spent": max(r.epsilon for r, _ in runs),
                     "delta": runs[0][0].delta, "noise_multiplier": runs[0][0].noise_multiplier,
                     "seeds": len(runs), "dp_accuracy": accuracy,
                     "dp_accuracy_sd": statistics.pstdev(a for _, a in runs),
                     "non_dp_recipe_accuracy": statistics.mean(non_dp),
                     "cost_points": 100 * (statistics.mean(non_dp) - accuracy)})
    return rows


SEARCH = ({"sample_rate": (0.1, 0.25, 0.5), "epochs": (20, 50, 100), "lr": (1e-3, 3e-3, 1e-2),
           "max_grad_norm": (1.0,)},
          {"sample_rate": (0.1, 0.25), "epochs": (100, 200), "lr": (1e-2, 2e-2, 5e-2),
           "max_grad_norm": (0.1, 1.0)})
"""The two stages of the recipe search: a coarse grid, then one around its best (rate 0.1-0.25,
100 epochs, lr 1e-2) with a longer run, larger steps and a smaller clipping norm."""


def search(quick: bool) -> Rows:
    """The search behind ``guard.dp.DP_RECIPE``: DP-SGD at epsilon 8 on the target part of split 0,
    accuracy on its auxiliary part (the test part is never looked at); quick: the second stage."""
    data, parts = _digits()
    train = (data.X[parts.train], data.y[parts.train])
    rows = []
    for stage in SEARCH[1:] if quick else SEARCH:
        for values in itertools.product(*stage.values()):
            recipe = dp.DPRecipe(**dict(zip(stage, values)))
            torch.manual_seed(0)
            model = models.make_model("mlp", data.n_features, data.n_classes)
            trained, report = dp.train_private(model, train, target_epsilon=8.0, seed=0,
                                               **recipe.options(len(parts.train)))
            rows.append({**dict(zip(stage, values)), "noise_multiplier": report.noise_multiplier,
                         "aux_accuracy": models.accuracy(trained, data.X[parts.aux], data.y[parts.aux])})
    return rows


SECTIONS = {"overhead": overhead, "accuracy": accuracy_vs_epsilon, "search": search}


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
