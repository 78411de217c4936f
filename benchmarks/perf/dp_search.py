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
Deep Learning with Differential Privacy") and fewer hidden units (less noise in total). Round 1
changes one setting of the starting recipe at a time (``VARIATIONS``); round 2 combines every
change that beat the start, tries each of them left out again, and each changed number one step
further the same way; round 3 doubles the best's expected batch, epochs or learning rate, or returns
a moving average of its weights (De et al. 2022, "Unlocking High-Accuracy Differentially Private
Image Classification through Scale", §3.2: post-processing, free). A
non-private row gives the proxy's ceiling (the bench's non-DP recipe on the same folds).

Faces (``--data faces``) have no public data to search on: 280 training photos (7 of each of 40
people), 40 auxiliary and 80 test photos. That search (``FACES_GRID``: the softmax target, which is
the cheaper and the better one under DP) trains on the private training part and validates on the
auxiliary part; each of its runs is (epsilon, delta)-DP, so by basic composition the whole search
is (runs x epsilon, runs x delta)-DP for those 280 photos, which is no meaningful guarantee: its
figures say what DP costs there, not a private model.

Run: ``python -m benchmarks.perf.dp_search [--data digits|faces] [--epsilon 8] [--workers 2]``; each setting's mean
validation accuracy over the three folds is printed as it finishes, then the table, best first.
"""
from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch

from benchmarks import datasets, models
from benchmarks.perf.attacks import Rows, print_table
from guard import dp

START = {"sample_rate": 0.1, "epochs": 100, "lr": 1e-2, "max_grad_norm": 1.0, "optimizer": "adam",
         "activation": "relu", "hidden": 64, "average": None}
"""Round 1's starting point: the recipe before this search (the bench's MLP, DP-Adam)."""
VARIATIONS = ({"activation": "tanh"}, {"hidden": 16}, {"max_grad_norm": 0.1},
              {"sample_rate": 0.25}, {"sample_rate": 0.05, "epochs": 50}, {"epochs": 50}, {"epochs": 200},
              {"lr": 3e-3}, {"lr": 3e-2},
              {"optimizer": "sgd", "lr": 0.1}, {"optimizer": "sgd", "lr": 0.5})
"""Round 1: one change each (DP-SGD's learning rate is on another scale than Adam's, so it comes with one)."""
FACES_GRID = [{"sample_rate": q, "epochs": e, "lr": lr, "max_grad_norm": 1.0, "optimizer": "adam"}
              for q in (0.1, 0.5) for e in (30, 100, 300) for lr in (1e-2, 1e-1)]
"""The faces search: expected batch, epochs and Adam's learning rate around the digits recipe."""
AVERAGES = (0.95, 0.99)
"""Decays of the weights' moving average tried in round 3 (De et al. 2022, §3.2: free post-processing)."""
FOLDS = 3
MARGIN = 1 / 450
"""A change "helps" when it gets at least one more of the 450 validation rows right than the start."""
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


def evaluate(setting: dict, epsilon: float | None) -> float:
    """Mean validation accuracy of ``setting`` over the folds, DP-SGD at ``epsilon`` scaled to the proxy
    (``None``: the bench's non-private recipe)."""
    torch.set_num_threads(1)
    scores = []
    for fold, ((X, y), (X_val, y_val)) in enumerate(proxy_folds()):
        torch.manual_seed(fold)
        model = models.make_model("mlp", X.shape[1], 10, setting["hidden"], setting["activation"])
        if epsilon is None:
            trained = models.train_recipe(model, models.recipe("digits", "mlp").sized(len(X)), X, y, fold)
            scores.append(models.accuracy(trained, X_val, y_val))
            continue
        recipe = dp.DPRecipe(**{k: setting[k] for k in ("sample_rate", "epochs", "lr", "max_grad_norm", "average")})
        try:
            trained, _ = dp.train_private(model, (X, y), target_epsilon=epsilon * PRIVATE_ROWS / len(X), seed=fold,
                                          optimizer=setting["optimizer"], **recipe.options(len(X)))
        except dp.DPConfigError:
            return float("nan")
        scores.append(models.accuracy(trained, X_val, y_val))
    return statistics.mean(scores)


def evaluate_faces(setting: dict, epsilon: float) -> float:
    """Validation (auxiliary part) accuracy of the faces softmax target trained with ``setting`` on the
    private training part of split 0 at ``epsilon``."""
    torch.set_num_threads(1)
    data = datasets.load("faces")
    split = datasets.split(data, seed=0)
    X, y = data.X[split.train], data.y[split.train]
    torch.manual_seed(0)
    model = models.recipe("faces", "softmax").build(data.n_features, data.n_classes)
    recipe = dp.DPRecipe(**{k: setting[k] for k in ("sample_rate", "epochs", "lr", "max_grad_norm")})
    trained, _ = dp.train_private(model, (X, y), target_epsilon=epsilon, seed=0, optimizer=setting["optimizer"],
                                  **recipe.options(len(X)))
    return models.accuracy(trained, data.X[split.aux], data.y[split.aux])


def run(settings: list[dict], epsilon: float | None, workers: int, score=evaluate) -> Rows:
    """Each setting's validation accuracy (printed as it finishes), best first."""
    rows = []
    with ProcessPoolExecutor(workers) as pool:
        running = {pool.submit(score, setting, epsilon): setting for setting in settings}
        for done in as_completed(running):
            rows.append({**running[done], "val_accuracy": done.result()})
            print(rows[-1], flush=True)
    return sorted(rows, key=lambda r: -np.nan_to_num(r["val_accuracy"], nan=-1.0))


def combine(start: dict, first: Rows) -> list[dict]:
    """Round 2: every round-1 change that beat ``start`` at once (per setting, its best value), that
    combination with each change left out, and with each changed number one step further the same way
    (the factor it changed by, again)."""
    baseline = next(r["val_accuracy"] for r in first if all(r[k] == v for k, v in start.items()))
    better = [r for r in first if r["val_accuracy"] > baseline + MARGIN]  # best first
    changes: dict[str, object] = {}
    for row in better:
        changed = {k: row[k] for k in start if row[k] != start[k]}
        if not set(changed) & set(changes):
            changes.update(changed)
    combined = {**start, **changes}
    settings = [combined] if len(changes) > 1 else []
    settings += [{**combined, key: start[key]} for key in changes if len(changes) > 1]
    for key, value in changes.items():
        if isinstance(value, (int, float)):
            further = type(value)(value * value / start[key])
            settings.append({**combined, key: min(further, 0.5) if key == "sample_rate" else further})
    tried = [{k: r[k] for k in start} for r in first]
    return [s for i, s in enumerate(settings) if s not in tried and s not in settings[:i]]


def neighbours(best: dict, tried: list[dict]) -> list[dict]:
    """Round 3: the best setting so far with its expected batch, epochs or learning rate doubled, where
    not yet tried (a larger batch is what helped most in round 1), and returning a moving average of
    its weights (``AVERAGES``)."""
    settings = [{**best, "sample_rate": min(2 * best["sample_rate"], 0.5)}, {**best, "epochs": 2 * best["epochs"]},
                {**best, "lr": 2 * best["lr"]}, *({**best, "average": decay} for decay in AVERAGES)]
    return [s for s in settings if s not in tried]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0, help="the private run's epsilon")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--data", choices=("digits", "faces"), default="digits")
    args = parser.parse_args(argv)
    if args.data == "faces":
        rows = run(FACES_GRID, args.epsilon, args.workers, evaluate_faces)
        print_table(f"faces softmax at epsilon {args.epsilon}: {len(rows)} runs on the private training part "
                    f"(basic composition: {len(rows) * args.epsilon:g}-DP for the search)", rows)
        return
    ceiling = run([START], None, 1)
    print_table("the proxy without DP (the bench's non-private recipe, START's architecture)", ceiling)
    settings = [START, *({**START, **change} for change in VARIATIONS)]
    first = run(settings, args.epsilon, args.workers)
    print_table(f"round 1: one change each, epsilon {args.epsilon} (proxy "
                f"{args.epsilon * PRIVATE_ROWS / 300:.1f} on 300 rows)", first)
    second = run(combine(START, first), args.epsilon, args.workers)
    print_table("round 2: the changes that helped, together, each left out, each one step further", second)
    tried = [{k: r[k] for k in START} for r in first + second]
    best = max(first + second, key=lambda r: np.nan_to_num(r["val_accuracy"], nan=-1.0))
    third = run(neighbours({k: best[k] for k in START}, tried), args.epsilon, args.workers)
    print_table("round 3: the best's neighbours", third)


if __name__ == "__main__":
    main()
