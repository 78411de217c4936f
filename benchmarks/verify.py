"""``guard verify``: a suspect model (a live endpoint, described as ``guard audit`` describes one, or a
local model) tested against the watermark records with ``attacks.ownership.OwnershipTest``."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.ownership import Records, Verification
from attacks.targets import HTTPTarget
from benchmarks.audit import Endpoint
from guard.data import Dataset
from guard.models import model_from
from guard.policy import RoutePolicy
from guard.references import import_function


def endpoint_suspect(url: str, records: Records, n_classes: int, route: RoutePolicy, example: Any = None,
                     batch_size: int | None = None, api_keys: tuple[str, ...] = (),
                     client: Any = None) -> HTTPTarget:
    """The suspect endpoint at ``url`` as a target sent the records' features as they are (the
    guarded server received them so); ``client`` (an ASGI app or httpx client) replaces the network."""
    endpoint = Endpoint(url, route, example, batch_size, scale=True)
    endpoint.check(records.features.shape[1])
    shape = Dataset("records", records.features, records.labels, n_classes)
    return endpoint.target(shape, client, api_keys=api_keys)


def local_suspect(weights: str | Path, factory: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A local model's labels: ``factory`` (``module:function`` returning the ``nn.Module``) with the
    state dict at ``weights`` (loaded with ``weights_only``), or, without a factory, the TorchScript
    module at ``weights``."""
    if factory is None:
        model = torch.jit.load(str(weights), map_location="cpu")
    else:
        model = model_from(import_function(factory))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(X, dtype=torch.float32)).argmax(dim=1).numpy()

    return predict


def report_lines(verification: Verification) -> list[str]:
    """What ``guard verify`` prints: per-client and overall counts, p-values, verdict, assumptions."""
    def line(e) -> str:
        verdict = "ACCUSED: copied from the owner's answers" if e.accused else "not accused"
        return (f"{e.scope}: reproduced {e.reproduced} of {e.watermarks} watermark labels; agreed with "
                f"{e.agreed} of {e.controls} control labels; p = {e.p_value:.3g} (alpha {e.alpha:g}): {verdict}")

    lines = [f"verification queries: {verification.queries}"]
    lines += ["per client:", *("  " + line(e) for e in verification.clients)]
    lines += ["overall:", "  " + line(verification.overall), "assumptions:"]
    return lines + [f"  - {assumption}" for assumption in verification.assumptions]
