"""The one small protocol every query-pattern detector implements: it judges a batch of
observations at once, each as if the observations had arrived one after another."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Observation:
    """One answered request as the monitor sees it: who sent it (``client``), its feature rows
    (``n`` of ``d``: an ``(n, d)`` array, or lists as the request path reads them), the model's
    own labels for them (``n`` ints: an array or a list) and the guarded ``route`` it came on."""

    client: str
    features: np.ndarray | list[list[float]]
    predicted: np.ndarray | list[int]
    route: str = ""


def with_array(observation: Observation) -> Observation:
    """``observation`` with its feature rows as one float64 ``(n, d)`` array, converted once for
    every detector (the request path hands lists)."""
    if isinstance(observation.features, np.ndarray):
        return observation
    return Observation(observation.client, np.array(observation.features, dtype=np.float64),
                       observation.predicted, observation.route)


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


class Detector(ABC):
    """A detector keeps its state in the ``StateStore`` it was built with. ``observe_batch`` is
    its one implementation; ``observe`` is a batch of one."""

    name: str

    @abstractmethod
    async def observe_batch(self, observations: Sequence[Observation]) -> list[Verdict]:
        """Record ``observations`` in order and return one verdict per observation, the same as
        observing them one at a time (a client's state must have no other writer meanwhile)."""

    async def observe(self, client: str, features: np.ndarray, predicted: np.ndarray) -> Verdict:
        """Record a request's queries (``features`` ``(n, d)``, model labels ``(n,)``) from
        ``client`` and judge them."""
        return (await self.observe_batch([Observation(client, features, predicted)]))[0]
