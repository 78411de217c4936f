"""Query-pattern detectors behind one protocol (``Detector.observe_batch -> [Verdict]``, one verdict per
``Observation``), chosen by name; the monitor that runs them off the request path is
``guard.monitoring``."""

from __future__ import annotations

from typing import Any

from guard.detectors.base import Detector, Observation, Verdict
from guard.detectors.prada import Prada
from guard.detectors.similarity import Similarity, SimilarityVerdict
from guard.store.base import StateStore

DETECTORS: dict[str, type] = {Prada.name: Prada, Similarity.name: Similarity}


def build_detector(name: str, config: dict[str, Any], store: StateStore) -> Detector:
    """The detector registered as ``name``, configured by the keyword arguments in ``config``
    (e.g. a policy's ``{"delta": 0.95}``) and keeping its state in ``store``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}: use one of {sorted(DETECTORS)}")
    return DETECTORS[name](store, **config)


__all__ = [
    "DETECTORS",
    "Detector",
    "Observation",
    "Prada",
    "Similarity",
    "SimilarityVerdict",
    "Verdict",
    "build_detector",
]
