"""What ``guard train-dp`` did to the data before training, saved beside the model so the served
model (``RawFeatureModel``) takes the features as they were in the user's file and answers with the
file's labels."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from guard.dp.checks import one_line
from guard.dp.report import write_atomic
from guard.models import predict_proba

PREPROCESSING_FILE = "preprocessing.json"


@dataclass(frozen=True)
class Preprocessing:
    """Min-max scaling of each feature from ``[low, high]`` to ``[0, 1]`` (a constant feature maps
    to 0), and ``classes``: the original label of each class index the model predicts."""

    low: list[float]
    high: list[float]
    classes: list

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> Preprocessing:
        return cls(**json.loads(Path(path).read_text()))


class RawFeatureModel(nn.Module):
    """A trained network ready to serve (what ``guard.dp.load`` returns): ``model`` behind the
    saved scaling, when the run saved one, so it takes features as they were in the training file.

    Called as a module on a tensor (``served(x)``) it returns the network's *logits*, ``(n,
    classes)``, unchecked. ``predict_proba(X)`` and ``predict(X)`` take raw feature rows (a numpy
    array or nested lists, ``(n, n_features)``), refuse anything else with a one-line ``ValueError``
    (wrong width, NaN or infinity, not numbers), and return the probabilities (the softmax of the
    logits, float64) and the labels (``classes[i]``, the original label of output ``i``; the index
    when the run mapped no labels)."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None,
                 classes: list | None = None) -> None:
        super().__init__()
        self.model = model
        if preprocessing is None:  # no scaling: the identity, for rows of any width
            low, span = np.zeros(1, dtype=np.float32), np.ones(1, dtype=np.float32)
        else:
            low = np.asarray(preprocessing.low, dtype=np.float32)
            span = np.asarray(preprocessing.high, dtype=np.float32) - low
            classes = preprocessing.classes
        self.register_buffer("low", torch.from_numpy(low))
        self.register_buffer("span", torch.from_numpy(np.where(span > 0, span, 1.0).astype(np.float32)))
        self.n_features = None if preprocessing is None else len(low)
        self.classes = None if classes is None else list(classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model((features - self.low) / self.span)

    def rows(self, X: object) -> np.ndarray:
        """``X`` as checked float32 rows of raw features."""
        width = "d" if self.n_features is None else self.n_features
        try:
            rows = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"features must be numbers in rows of equal length: {error}") from None
        if rows.ndim != 2:
            raise ValueError(f"features must be a 2-D array of shape (n, {width}), got shape {rows.shape} "
                             "(one row: X.reshape(1, -1))")
        if self.n_features is not None and rows.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features (as in the training data), "
                             f"got {rows.shape[1]}")
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        if len(bad):
            raise ValueError(f"features must be finite: row(s) {bad[:5].tolist()} hold NaN or infinity")
        return rows

    def predict_proba(self, X: object) -> np.ndarray:
        """Class probabilities ``(n, classes)`` for raw feature rows ``X``."""
        rows = self.rows(X)
        try:
            return predict_proba(self, rows)
        except RuntimeError as error:  # rows of a width the network cannot take (no scaling saved)
            raise ValueError(f"the model cannot take rows of {rows.shape[1]} features: {one_line(error)}") from None

    def predict(self, X: object) -> np.ndarray:
        """The label of each raw feature row (``classes[i]`` for output ``i``)."""
        top = self.predict_proba(X).argmax(axis=1)
        return top if self.classes is None else np.asarray(self.classes)[top]
