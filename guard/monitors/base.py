"""The one small protocol every query-pattern detector implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Verdict:
    """A detector's judgement of the query it just observed: its ``score`` (larger is more
    suspicious), whether the score crossed the detector's threshold (``alarm``) and, for an alarm
    raised across clients, the other clients whose earlier queries it matched (``accomplices``:
    in a Sybil attack, the attacker's other keys)."""

    detector: str
    score: float
    alarm: bool
    accomplices: tuple[str, ...] = ()


class Detector(Protocol):
    name: str

    async def observe(self, client: str, features: np.ndarray, predicted: np.ndarray) -> Verdict:
        """Record a batch of queries (``features`` ``(n, d)``, model labels ``(n,)``) from ``client``
        and judge them; state lives in the ``StateStore`` the detector was built with."""
