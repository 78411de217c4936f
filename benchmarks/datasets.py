"""Datasets for the benchmarks: bundled scikit-learn data and the user's own CSV/NPZ files.

Every dataset is returned with features scaled to [0, 1] (the box that extraction attacks sample
uniform inputs from, and that inversion attacks clip to) and integer labels 0..k-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUNDLED = ("digits", "breast_cancer")


@dataclass(frozen=True)
class Dataset:
    """Features in [0, 1] as float32 ``(n, d)``, labels as int64 ``(n,)``; ``low``/``high`` the
    per-feature box of the features as loaded (``raw`` maps back to it); ``classes`` the original
    label values, in the order of the integer labels."""

    name: str
    X: np.ndarray
    y: np.ndarray
    n_classes: int
    image_shape: tuple[int, int] | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    classes: tuple | None = None

    def raw(self, X: np.ndarray) -> np.ndarray:
        """Features in [0, 1] mapped back to the scale they were loaded in."""
        X = np.asarray(X, dtype=np.float64)
        return X if self.low is None else self.low + X * (self.high - self.low)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def subset(self, index: np.ndarray) -> "Dataset":
        return Dataset(self.name, self.X[index], self.y[index], self.n_classes, self.image_shape, self.low,
                       self.high, self.classes)


@dataclass(frozen=True)
class Split:
    """Disjoint index sets: the target's training members, held-out test data, and the
    attacker's auxiliary pool (data from the same distribution the target never saw)."""

    train: np.ndarray
    test: np.ndarray
    aux: np.ndarray


def load(name: str) -> Dataset:
    """A bundled dataset by name, or a user's ``.csv`` / ``.npz`` file by path."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return _make("digits", bunch.data / 16.0, bunch.target, image_shape=(8, 8))
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return _make("breast_cancer", bunch.data, bunch.target)
    path = Path(name)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".csv":
        return load_csv(path)
    raise ValueError(f"unknown dataset {name!r}: use one of {BUNDLED} or a .csv/.npz file path")


def load_npz(path: str | Path) -> Dataset:
    """An NPZ file with arrays ``X`` (n, d) and ``y`` (n,)."""
    with np.load(path, allow_pickle=False) as data:
        if "X" not in data or "y" not in data:
            raise ValueError(f"{path}: an NPZ dataset needs arrays named 'X' and 'y'")
        return _make(Path(path).stem, data["X"], data["y"])


def load_csv(path: str | Path, label_column: str | int = -1) -> Dataset:
    """A numeric CSV file with a header row; the label column is the last one unless named."""
    path = Path(path)
    with path.open() as handle:
        header = handle.readline().strip().split(",")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    column = header.index(label_column) if isinstance(label_column, str) else label_column
    labels = table[:, column]
    features = np.delete(table, column, axis=1)
    return _make(path.stem, features, labels)


def split(dataset: Dataset, seed: int, train: float = 0.5, test: float = 0.25) -> Split:
    """A seeded random split into target-train, test and attacker-auxiliary parts."""
    order = np.random.default_rng(seed).permutation(len(dataset.y))
    n_train = int(round(train * len(order)))
    n_test = int(round(test * len(order)))
    return Split(order[:n_train], order[n_train : n_train + n_test], order[n_train + n_test :])


def _make(name: str, X: np.ndarray, y: np.ndarray, image_shape=None) -> Dataset:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"{name}: features must be a non-empty 2-D array, got shape {X.shape}")
    if len(y) != len(X):
        raise ValueError(f"{name}: {len(X)} feature rows but {len(y)} labels")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    classes, labels = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name}: needs at least two classes, found {len(classes)}")
    low, high = X.min(axis=0), X.max(axis=0)
    scaled = (X - low) / np.where(high > low, high - low, 1.0)
    return Dataset(name, scaled.astype(np.float32), labels.astype(np.int64), len(classes), image_shape, low, high,
                   tuple(int(c) if isinstance(c, float) and c.is_integer() else c for c in classes.tolist()))
