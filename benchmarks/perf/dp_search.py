"""The search behind ``guard.dp.DP_RECIPE``, run on public data only, so it costs the private
training data no privacy.

The private data of the digits benchmark is the training part of split 0 (898 rows). The search
never reads it: it trains on the *auxiliary* part of split 0 (450 rows, public in the bench's threat
model: the attacker's own population), cut into three folds of 300 training and 150 validation rows.
A proxy of 300 rows is harder than the real task at the same epsilon: the noise on DP-SGD's mean
gradient is ``sigma C / (q n)`` and, for a fixed number of steps ``T`` and sample rate ``q``, the
noise multiplier needed for (epsilon, delta)-DP grows as ``q sqrt(T log(1/delta)) / epsilon``
(Abadi et al. 2016, Thm. 1), so the noise scales with ``1 / (n epsilon)``. The proxy runs at
``epsilon * n_private / n_proxy`` to keep ``n epsilon`` and thus the noise the recipe has to cope
with. The recipe is stated without the data's size (a sample rate, epochs, learning rate, clipping
norm, optimiser, architecture), so it transfers.

Search space: the training settings (expected batch as a share of the data, epochs, learning rate,
clipping norm, DP-Adam or DP-SGD with momentum 0.9) and the architecture choices known to help
DP-SGD: bounded (tanh) activations (Papernot et al., AAAI 2021, "Tempered Sigmoid Activations for
Deep Learning with Differential Privacy") and fewer hidden units (less noise in total). Stage 1
draws ``--configs`` settings at random from the grid; stage 2 refines the best around it.

Run: ``python -m benchmarks.perf.dp_search [--epsilon 8] [--configs 48] [--workers 2]``; the
table lists each setting's mean validation accuracy over the three folds, best first.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from benchmarks import datasets
from benchmarks.perf.attacks import Rows, print_table
from guard import dp, models

GRID = {"sample_rate": (0.05, 0.1, 0.25), "epochs": (30, 100, 200), "max_grad_norm": (0.1, 1.0),
        "optimizer": ("adam", "sgd"), "activation": ("relu", "tanh"), "hidden": (16, 64)}
"""Stage 1's grid; the learning rate is drawn per optimiser from ``LEARNING_RATES``."""
LEARNING_RATES = {"adam": (1e-3, 3e-3, 1e-2, 3e-2), "sgd": (0.1, 0.3, 1.0, 3.0)}
FOLDS = 3
PRIVATE_ROWS = 898  # the training part of split 0 of digits, which the search never reads


def proxy_folds() -> list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Three (train, validation) folds of the auxiliary part of digits' split 0."""
    data = datasets.load("digits")
    aux = datasets.split(data, seed=0).aux
    order = np.random.default_rng(0).permutation(aux)
    parts = np.array_split(order, FOLDS)
    folds = []
    for k in range(FOLDS):
        train = np.concatenate([p for j, p in enumerate(parts) if j != k])
        folds.append(((data.X[train], data.y[train]), (data.X[parts[k]], data.y[parts[k]])))
    return folds


def evaluate(setting: dict, epsilon: float) -> float:
    """Mean validation accuracy of ``setting`` over the folds, DP-SGD at ``epsilon`` scaled to the proxy."""
    torch.set_num_threads(1)
    scores = []
    for fold, ((X, y), (X_val, y_val)) in enumerate(proxy_folds()):
        torch.manual_seed(fold)
        model = models.make_model("mlp", X.shape[1], 10, setting["hidden"], setting["activation"])
        recipe = dp.DPRecipe(**{k: setting[k] for k in ("sample_rate", "epochs", "lr", "max_grad_norm")})
        try:
            trained, _ = dp.train_private(model, (X, y), target_epsilon=epsilon * PRIVATE_ROWS / len(X), seed=fold,
                                          optimizer=setting["optimizer"], **recipe.options(len(X)))
        except dp.DPConfigError:
            return float("nan")
        scores.append(models.accuracy(trained, X_val, y_val))
    return statistics.mean(scores)


def stage_one(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    grid = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    chosen = [grid[i] for i in rng.choice(len(grid), min(count, len(grid)), replace=False)]
    return [{**s, "lr": float(rng.choice(LEARNING_RATES[s["optimizer"]]))} for s in chosen]


def stage_two(best: dict) -> list[dict]:
    """Around ``best``: each numeric setting one step up and down, one at a time."""
    steps = {"sample_rate": 2.0, "epochs": 2.0, "lr": 3.0, "max_grad_norm": 3.0, "hidden": 2}
    around = []
    for key, factor in steps.items():
        for value in (best[key] / factor, best[key] * factor):
            value = type(best[key])(value) if key in ("epochs", "hidden") else float(value)
            if key == "sample_rate" and value > 0.5:
                continue
            around.append({**best, key: value})
    flipped = {"activation": {"relu": "tanh", "tanh": "relu"}[best["activation"]]}
    return around + [{**best, **flipped}]


def run(settings: list[dict], epsilon: float, workers: int) -> Rows:
    with ProcessPoolExecutor(workers) as pool:
        scores = list(pool.map(evaluate, settings, itertools.repeat(epsilon)))
    rows = [{**s, "val_accuracy": a} for s, a in zip(settings, scores)]
    return sorted(rows, key=lambda r: -np.nan_to_num(r["val_accuracy"], nan=-1.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0, help="the private run's epsilon")
    parser.add_argument("--configs", type=int, default=48, help="stage 1's random settings")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    args = parser.parse_args(argv)
    first = run(stage_one(args.configs), args.epsilon, args.workers)
    print_table(f"stage 1: {args.configs} random settings, epsilon {args.epsilon} (proxy "
                f"{args.epsilon * PRIVATE_ROWS / 300:.1f} on 300 rows)", first)
    best = {k: v for k, v in first[0].items() if k != "val_accuracy"}
    second = run(stage_two(best), args.epsilon, args.workers)
    print_table("stage 2: around stage 1's best", [first[0], *second])


if __name__ == "__main__":
    main()
