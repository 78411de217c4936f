"""Everything checked before DP-SGD starts: the data, the options, the model's layers, and whether
the privacy target is reachable; each failure a :class:`DPConfigError`."""
from __future__ import annotations

import copy
import functools
import math

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
OPTIMISERS = ("adam", "sgd")
#: Beyond this noise multiplier the noisy gradient carries next to no signal; refuse such targets.
MAX_NOISE_MULTIPLIER = 50.0


class DPConfigError(ValueError):
    """The request cannot be trained privately as given; raised before any training starts."""


class UnsupportedLayersError(DPConfigError):
    """The model has layers DP-SGD cannot train (BatchNorm mixes examples) and ``fix=False``."""


def default_delta(n: int) -> float:
    """``min(1e-5, 1/(10 n))``: well below ``1/n``, the rate at which a mechanism that publishes
    random whole records would still be "(0, delta)-private"; 1e-5 is the customary ceiling."""
    return min(1e-5, 1.0 / (10 * n))


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's shape and state-dict errors span several)."""
    return " ".join(str(error).split())


def prepare_model(model: nn.Module, fix: bool = True) -> tuple[nn.Module, list[str]]:
    """Check ``model`` with Opacus's ``ModuleValidator``; return a DP-trainable copy and a line per
    change made, or raise :class:`UnsupportedLayersError` listing the offending layers."""
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model, []
    if not fix:
        listing = "\n".join(f"  - {error}" for error in errors)
        raise UnsupportedLayersError("model has layers DP-SGD cannot train (pass fix=True to "
                                     f"replace them):\n{listing}")
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise UnsupportedLayersError("Opacus cannot fix these layers:\n"
                                     + "\n".join(f"  - {error}" for error in remaining))
    before = dict(model.named_modules())
    changes = []
    for name, layer in list(fixed.named_modules()):
        old = before.get(name)
        if old is None or type(old) is type(layer):
            continue
        if isinstance(old, nn.BatchNorm1d) and isinstance(layer, nn.GroupNorm):
            # Opacus picks gcd(32, C) groups: on (n, C) features that is one value per group, which
            # normalises every activation to zero; one group normalises across the example instead.
            layer = nn.GroupNorm(1, old.num_features, affine=old.affine)
            fixed.set_submodule(name, layer)
        detail = f" with {layer.num_groups} group(s)" if isinstance(layer, nn.GroupNorm) else ""
        lost = " (pretrained running statistics discarded)" if isinstance(
            old, nn.modules.batchnorm._BatchNorm) else ""
        changes.append(f"{name}: {type(old).__name__} -> {type(layer).__name__}{detail}{lost}")
    return fixed, changes


def as_tensors(data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = data
    return (torch.as_tensor(np.asarray(X), dtype=torch.float32),
            torch.as_tensor(np.asarray(y)).long())


def check_data(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """Reject empty, one-class, mismatched or out-of-range training data (the classes are the
    model's outputs)."""
    if len(X) == 0:
        raise DPConfigError("the training data is empty")
    if X.ndim < 2 or len(y) != len(X) or y.ndim != 1:
        raise DPConfigError(f"need features (n, d...) and labels (n,), got {tuple(X.shape)} and "
                            f"{tuple(y.shape)}")
    if not torch.isfinite(X).all():
        raise DPConfigError("the features contain NaN or infinity")
    try:
        with torch.no_grad():
            outputs = copy.deepcopy(model).eval()(X[:1])
    except RuntimeError as error:
        raise DPConfigError(f"the model cannot take the data's rows of shape {tuple(X.shape[1:])}: "
                            f"{one_line(error)}") from None
    if outputs.ndim != 2:
        raise DPConfigError(f"the model answers a row with shape {tuple(outputs.shape[1:])}: it must "
                            "return one logit per class, (n, classes)")
    n_classes = int(outputs.shape[-1])
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise DPConfigError(f"labels must lie in 0..{n_classes - 1} (the model's {n_classes} "
                            "outputs), "
                            f"found {int(y.min())}..{int(y.max())}")
    if len(torch.unique(y)) < 2:
        raise DPConfigError("the training data has a single class; there is nothing to learn")


def check_options(n: int, target_epsilon: float, delta: float, epochs: int, batch_size: int,
                  accountant: str, grad_sample_mode: str, optimizer: str) -> None:
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise DPConfigError(f"target_epsilon must be a positive number, got {target_epsilon}")
    if not 0 < delta < 1 / n:
        raise DPConfigError(f"delta must lie in (0, 1/n) = (0, {1 / n:.3g}) for n={n} examples, "
                            f"got {delta}: a delta of 1/n allows publishing a whole example")
    if epochs < 1 or batch_size < 1:
        raise DPConfigError(f"epochs and batch_size must be positive, got {epochs} and "
                            f"{batch_size}")
    if batch_size >= n:
        raise DPConfigError(f"batch_size {batch_size} must be smaller than the {n} examples")
    for name, value, allowed in (("accountant", accountant, ACCOUNTANTS),
                                 ("grad_sample_mode", grad_sample_mode, GRAD_SAMPLE_MODES),
                                 ("optimizer", optimizer, OPTIMISERS)):
        if value not in allowed:
            raise DPConfigError(f"unknown {name} {value!r}: use one of {allowed}")


def check_shards(batch_size: int, world: int, smallest: int = 16) -> None:
    """Opacus's distributed Poisson sampler skips a process's step when its share of the batch is
    empty, and the other processes then wait for it forever: keep that chance below ~1e-7."""
    if world > 1 and batch_size / world < smallest:
        raise DPConfigError(f"batch_size {batch_size} over {world} processes leaves fewer than "
                            f"{smallest} examples a process per step; use a larger batch or fewer "
                            "processes")


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str, max_noise_multiplier: float) -> float:
    """Opacus's search (what ``make_private_with_epsilon`` does), but for the exact step count:
    ``make_private_with_epsilon`` passes ``epochs`` and Opacus computes
    ``int(epochs / sample_rate)``, which floors e.g. 3 epochs of 75 batches to 224 steps, so the
    run would overshoot its target. The search evaluates the accountant dozens of times (seconds
    with PRV), so its answer is kept per argument tuple for the life of the process."""
    ceiling = create_accountant(accountant)
    ceiling.history = [(max_noise_multiplier, sample_rate, steps)]
    if ceiling.get_epsilon(delta) > target_epsilon:
        raise DPConfigError(
            f"epsilon {target_epsilon} at delta {delta:.3g} over {steps} steps is unreachable with "
            f"noise multiplier <= {max_noise_multiplier} (beyond it the gradients drown in noise): "
            "raise the target, train fewer epochs, or use larger batches")
    try:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=steps, accountant=accountant)
    except ValueError as error:
        raise DPConfigError(f"epsilon {target_epsilon} is unreachable at delta {delta:.3g} in "
                            f"{steps} steps: {error}") from error
    return sigma

