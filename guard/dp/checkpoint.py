"""Saving and resuming DP-SGD runs without unpickling arbitrary objects: tensors through
``torch.save`` / ``torch.load(weights_only=True)``, the accountant's history and settings as
JSON."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from guard.dp.checks import DPConfigError, one_line, prepare_model
from guard.dp.preprocessing import PREPROCESSING_FILE, Preprocessing, RawFeatureModel
from guard.dp.report import PrivacyReport, write_atomic
from guard.models import model_from

MODEL_FILE, REPORT_FILE = "model.pt", "privacy_report.json"
_CKPT_MODEL, _CKPT_OPTIMISER, _CKPT_STATE = "model.pt", "optimizer.pt", "state.json"


def save(model: nn.Module, report: PrivacyReport, directory: str | Path,
         preprocessing: Preprocessing | None = None) -> None:
    """Write the model's state dict (``model.pt``), its report (``privacy_report.json``) and the
    data's preprocessing (``preprocessing.json``), when there was any."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(model.state_dict(), directory / MODEL_FILE)
    report.save(directory / REPORT_FILE)
    if preprocessing is not None:
        preprocessing.save(directory / PREPROCESSING_FILE)


def load(directory: str | Path, factory: Callable[[], nn.Module]) -> RawFeatureModel:
    """The trained model of a ``save``d run, ready to serve (eval mode). ``factory()`` builds the
    architecture as it was given to training: for ``guard train-dp --model mlp`` (or ``softmax``),
    ``lambda: guard.models.make_model("mlp", n_features, n_classes)``; for ``--model
    module:build``, ``lambda: module.build(n_features, n_classes)`` (``train-dp`` prints the line).
    The layers DP-SGD replaced (the report's ``model_changes``) are replaced again and the weights
    loaded into it; the result (``RawFeatureModel``) takes the features as they are in the training
    file when the run saved its preprocessing. ``served(tensor)`` gives logits,
    ``served.predict_proba(X)`` probabilities, ``served.predict(X)`` the original labels.
    A directory without a run, or weights that do not fit the factory's model: one-line
    ``FileNotFoundError`` or ``ValueError``; a factory that returns anything but the network:
    ``TypeError``."""
    directory = Path(directory)
    for name in (REPORT_FILE, MODEL_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} is missing: load the --out directory of guard "
                                    "train-dp (or of guard.dp.save)")
    report = PrivacyReport.load(directory / REPORT_FILE)
    model = model_from(factory)
    if report.model_changes:
        model, _ = prepare_model(model, fix=True)
    try:
        model.load_state_dict(load_state_dict(directory / MODEL_FILE))
    except RuntimeError as error:
        raise ValueError(f"the weights in {directory / MODEL_FILE} do not fit the model the factory builds "
                         f"(build the architecture given to training): {one_line(error)}") from None
    preprocessing = (Preprocessing.load(directory / PREPROCESSING_FILE)
                     if (directory / PREPROCESSING_FILE).exists() else None)
    return RawFeatureModel(model, preprocessing, report.classes).eval()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A saved state dict, loaded without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(directory: Path, model: nn.Module, optimiser: torch.optim.Optimizer,
                    history: list, noise_multiplier: float, epochs_done: int,
                    config: dict) -> None:
    """Weights and optimiser state as tensors (``torch.save``), the rest as JSON. The state file is
    written last, so a crash mid-save leaves the previous epoch's state consistent."""
    directory.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(model.state_dict(), directory / _CKPT_MODEL)
    torch_save_atomic(optimiser.state_dict(), directory / _CKPT_OPTIMISER)
    state = dict(config, epochs_done=epochs_done, noise_multiplier=noise_multiplier,
                 history=[list(segment) for segment in history])
    write_atomic(directory / _CKPT_STATE, json.dumps(state, indent=2).encode())


def load_checkpoint(directory: str | Path | None, model: nn.Module) -> dict | None:
    """Load a checkpoint into ``model`` (``weights_only``: never unpickles arbitrary objects)."""
    if directory is None:
        raise DPConfigError("resume=True needs a checkpoint_dir")
    directory = Path(directory)
    if not (directory / _CKPT_STATE).exists():
        return None
    state = json.loads((directory / _CKPT_STATE).read_text())
    model.load_state_dict(load_state_dict(directory / _CKPT_MODEL))
    optimiser_path = directory / _CKPT_OPTIMISER
    state["optimizer"] = load_state_dict(optimiser_path) if optimiser_path.exists() else None
    return state


def check_resumable(state: dict, n: int, batch_size: int, max_grad_norm: float, epochs: int,
                    accountant: str, delta: float) -> None:
    asked = dict(dataset_size=n, batch_size=batch_size, max_grad_norm=max_grad_norm, epochs=epochs,
                 accountant=accountant, delta=delta)
    differing = {key: (state.get(key), value) for key, value in asked.items()
                 if state.get(key) != value}
    if differing:
        raise DPConfigError("the checkpoint was made with other settings (saved, asked): "
                            + ", ".join(f"{key}={pair}" for key, pair in differing.items()))


def torch_save_atomic(obj: dict, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)

