"""Data sets the ``guard`` command trains and calibrates on (``train-dp``, ``calibrate``, ``demo``):
scikit-learn's digits and breast cancer, and the user's own CSV/NPZ files.

Every dataset is returned with features scaled to [0, 1] (the box that extraction attacks sample
uniform inputs from, and that inversion attacks clip to) and integer labels 0..k-1. Tabular
features are scaled column by column; images with one scale for every pixel, so an image stays the
same picture (a pixel column that happens to be dark everywhere is not stretched to white).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

BUNDLED = ("digits", "breast_cancer")
MAX_SENSITIVE_VALUES = 20


@dataclass(frozen=True)
class Dataset:
    """Features in [0, 1] as float32 ``(n, d)``, labels as int64 ``(n,)``.

    ``image_shape``: the shape each row is a flattened image of. ``train_per_class``: the data set's
    own protocol, when it has one (Fredrikson et al. 2015 train on 7 photos of each person).
    ``columns``: feature names (CSV header). ``sensitive``: the column of a discrete sensitive
    attribute, the target of attribute inference. ``low``/``high``: the box of the features as
    loaded (``raw`` maps back to it); ``classes``: the original label values, in the order of the
    integer labels."""

    name: str
    X: np.ndarray
    y: np.ndarray
    n_classes: int
    image_shape: tuple[int, ...] | None = None
    train_per_class: int | None = None
    columns: tuple[str, ...] | None = None
    sensitive: int | None = None
    low: np.ndarray | float | None = None
    high: np.ndarray | float | None = None
    classes: tuple | None = None

    def raw(self, X: np.ndarray) -> np.ndarray:
        """Features in [0, 1] mapped back to the scale they were loaded in."""
        X = np.asarray(X, dtype=np.float64)
        return X if self.low is None else self.low + X * (np.asarray(self.high) - self.low)

    def scaled(self, X: np.ndarray) -> np.ndarray:
        """Features in the scale they were loaded in mapped to this data set's [0, 1] (``raw``'s inverse;
        rows from elsewhere may land outside)."""
        X = np.asarray(X, dtype=np.float64)
        return X if self.low is None else min_max(X, self.low, self.high)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def subset(self, index: np.ndarray) -> "Dataset":
        return replace(self, X=self.X[index], y=self.y[index])

    def with_sensitive(self, column: str | int) -> "Dataset":
        """This data set with ``column`` (a name from the CSV header or an index) as its sensitive
        attribute; it must be discrete (at most ``MAX_SENSITIVE_VALUES`` values)."""
        index = _column_index(column, self.columns, self.n_features)
        values = np.unique(self.X[:, index])
        if len(values) < 2 or len(values) > MAX_SENSITIVE_VALUES:
            raise ValueError(f"{self.name}: sensitive column {column!r} has {len(values)} distinct values; "
                             f"attribute inference needs 2 to {MAX_SENSITIVE_VALUES} (bin a continuous one first)")
        return replace(self, sensitive=index)

    @property
    def sensitive_values(self) -> np.ndarray:
        """The values the sensitive attribute takes (scaled), sorted."""
        if self.sensitive is None:
            raise ValueError(f"{self.name} has no sensitive attribute")
        return np.unique(self.X[:, self.sensitive]).astype(np.float64)


@dataclass(frozen=True)
class Split:
    """Disjoint index sets: the target's training members, held-out test data, and the
    attacker's auxiliary pool (data from the same distribution the target never saw)."""

    train: np.ndarray
    test: np.ndarray
    aux: np.ndarray

    @property
    def held_out(self) -> np.ndarray:
        return np.concatenate([self.test, self.aux])


def load(name: str, sensitive: str | int | None = None) -> Dataset:
    """A bundled dataset by name, or a user's ``.csv`` / ``.npz`` file by path; ``sensitive`` names
    the column of a discrete sensitive attribute (else the file's own, for an NPZ that names one)."""
    dataset = _load(name)
    return dataset if sensitive is None else dataset.with_sensitive(sensitive)


def _load(name: str) -> Dataset:
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # scaled column by column, as every digits figure in the README is measured (a tested
        # attack's threshold moves with a global scale); users' images are scaled as pictures
        return replace(from_arrays("digits", bunch.data / 16.0, bunch.target), image_shape=(8, 8))
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return from_arrays("breast_cancer", bunch.data, bunch.target, columns=tuple(bunch.feature_names))
    path = Path(name)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".csv":
        return load_csv(path)
    raise ValueError(f"unknown dataset {name!r}: use one of {BUNDLED} or a .csv/.npz file path")


def load_npz(path: str | Path) -> Dataset:
    """An NPZ file with arrays ``X`` and ``y``. ``X`` of shape ``(n, d)`` is tabular, unless the file
    also holds ``image_shape`` (the shape of each flattened row); ``(n, h, w)`` or ``(n, h, w, c)``
    are images, kept as images. An optional scalar ``sensitive`` names the sensitive column's index."""
    with np.load(path, allow_pickle=False) as data:
        if "X" not in data or "y" not in data:
            raise ValueError(f"{path}: an NPZ dataset needs arrays named 'X' and 'y'")
        X, y = data["X"], data["y"]
        if "image_shape" in data:
            X = X.reshape(len(X), *(int(side) for side in data["image_shape"]))
        dataset = from_arrays(Path(path).stem, X, y)
        return dataset.with_sensitive(int(data["sensitive"])) if "sensitive" in data else dataset


def load_csv(path: str | Path, label_column: str | int = -1) -> Dataset:
    """A numeric CSV file with a header row; the label column is the last one unless named."""
    path = Path(path)
    with path.open() as handle:
        header = [name.strip() for name in handle.readline().strip().split(",")]
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    column = _column_index(label_column, tuple(header), len(header))
    labels = table[:, column]
    features = np.delete(table, column, axis=1)
    return from_arrays(path.stem, features, labels, columns=tuple(np.delete(header, column)))


def rows_like(reference: Dataset, other: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``other``'s rows as ``reference``'s are given to a model: features taken back to their own units
    and scaled through ``reference``'s box (values outside it land outside [0, 1]), labels mapped to
    ``reference``'s class indices. Another number of features, or a label ``reference`` lacks, is a
    ``ValueError``."""
    if other.n_features != reference.n_features:
        raise ValueError(f"{other.name} has {other.n_features} features, {reference.name} {reference.n_features}")
    index = {label: i for i, label in enumerate(reference.classes or range(reference.n_classes))}
    labels = other.classes or tuple(range(other.n_classes))
    missing = [label for label in labels if label not in index]
    if missing:
        raise ValueError(f"{other.name} has labels {missing} that {reference.name} lacks")
    X = reference.scaled(other.raw(other.X))
    return X.astype(np.float32), np.array([index[label] for label in labels], dtype=np.int64)[other.y]


def split(dataset: Dataset, seed: int, train: float = 0.5, test: float = 0.25) -> Split:
    """A seeded random split into target-train, test and attacker-auxiliary parts; for a data set
    with ``train_per_class``, that many records of each class train and the rest are dealt
    alternately to test and aux."""
    rng = np.random.default_rng(seed)
    if dataset.train_per_class is not None:
        parts: list[list[np.ndarray]] = [[], [], []]
        for label in range(dataset.n_classes):
            rows = rng.permutation(np.flatnonzero(dataset.y == label))
            rest = rows[dataset.train_per_class:]
            for part, rows_of_part in zip(parts, (rows[: dataset.train_per_class], rest[0::2], rest[1::2])):
                part.append(rows_of_part)
        return Split(*(rng.permutation(np.concatenate(part)) for part in parts))
    order = rng.permutation(len(dataset.y))
    n_train = int(round(train * len(order)))
    n_test = int(round(test * len(order)))
    return Split(order[:n_train], order[n_train : n_train + n_test], order[n_train + n_test :])


def _column_index(column: str | int, names: tuple[str, ...] | None, n: int) -> int:
    if isinstance(column, str) and not column.lstrip("-").isdigit():
        if names is None or column not in names:
            raise ValueError(f"no column named {column!r}; columns: {list(names or [])}")
        return names.index(column)
    index = int(column)
    if not -n <= index < n:
        raise ValueError(f"column {index} out of range for {n} columns")
    return index % n


def from_arrays(name: str, X: np.ndarray, y: np.ndarray, columns: tuple[str, ...] | None = None,
          image_range: tuple[float, float] | None = None) -> Dataset:
    """Validate and scale: arrays of 3 or more dimensions are images (``(n, h, w)``, ``(n, h, w, c)``),
    scaled by one range for all pixels (``image_range``, else their min and max); tables column by column."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim < 2 or len(X) == 0:
        raise ValueError(f"{name}: features must be a non-empty array of shape (n, d) or (n, h, w[, c]), "
                         f"got shape {X.shape}")
    if len(y) != len(X):
        raise ValueError(f"{name}: {len(X)} feature rows but {len(y)} labels")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    classes, labels = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name}: needs at least two classes, found {len(classes)}")
    image_shape = tuple(int(side) for side in X.shape[1:]) if X.ndim > 2 else None
    if image_shape is not None:
        low, high = image_range or (X.min(), X.max())
        X = X.reshape(len(X), -1)
    else:
        low, high = X.min(axis=0), X.max(axis=0)
    return Dataset(name, min_max(X, low, high).astype(np.float32), labels.astype(np.int64), len(classes), image_shape,
                   columns=columns, low=low, high=high,
                   classes=tuple(int(c) if isinstance(c, float) and c.is_integer() else c for c in classes.tolist()))


def min_max(X: np.ndarray, low, high) -> np.ndarray:
    """``X`` scaled from ``[low, high]`` to ``[0, 1]`` (a constant feature maps to 0)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    return (X - low) / np.where(high > low, high - low, 1.0)
