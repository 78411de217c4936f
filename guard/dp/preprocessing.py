"""What ``guard train-dp`` did to the data before training, saved beside the model so the served
model takes the features as they were in the user's file and answers with the file's labels."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from guard.dp.report import write_atomic

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
    """``model`` behind the saved scaling: called on features as they were in the training file;
    ``classes[i]`` is the original label of output ``i``."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        low = np.asarray(preprocessing.low, dtype=np.float32)
        span = np.asarray(preprocessing.high, dtype=np.float32) - low
        self.register_buffer("low", torch.from_numpy(low))
        self.register_buffer("span", torch.from_numpy(np.where(span > 0, span, 1.0).astype(np.float32)))
        self.classes = list(preprocessing.classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model((features - self.low) / self.span)
