"""The adaptive Sybil attacker against query monitoring: it rotates API keys (identities), drops a key
as soon as the endpoint shows it a sanction, and resends what that key lost through the next one.

Monitoring (PRADA, Juuti et al., EuroS&P 2019; similarity detectors in the spirit of Blacklight, Li et
al., USENIX Security 2022) sanctions *clients*: an attacker who holds many keys loses only the keys
that are caught, so the honest measure of monitoring is what stealing costs, not when the first key is
caught. ``KeyRotatingTarget`` is a ``Target`` any attack can query: it keeps ``active`` keys in use at
once (the rows of each call spread over them, one request per key in turn), reads a sanction off each
answer (``403``, throttling past the key's ``max_wait``, or labels where the endpoint answered
probabilities before: the degraded output), burns the key, and resends the request's rows through a
fresh key from its pool. ``natural`` mixes records of the attacker's own data into every request
(cover traffic the detectors see; their answers are discarded). ``cost`` is what it spent.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from attacks.targets import HTTPTarget, Target, TargetBlocked, TargetThrottled


class KeysExhausted(TargetBlocked):
    """Every key of the pool was sanctioned before the attack finished."""


@dataclass(frozen=True)
class AttackerCost:
    """What the attack spent: keys it used and lost, rows it sent (resent and cover rows included),
    rows lost to sanctioned answers, and the cover rows among them."""

    keys_used: int
    keys_burned: int
    queries_spent: int
    queries_lost: int
    natural_queries: int

    def hours(self, per_key_per_hour: float, parallel: int) -> float:
        """The least wall-clock time the rows take when every key may send ``per_key_per_hour`` rows
        an hour and ``parallel`` keys send at once."""
        return self.queries_spent / (per_key_per_hour * parallel)


class KeyRotatingTarget(Target):
    """Queries through ``keys`` (``connect(key)`` makes one key's ``HTTPTarget``), ``active`` at a time.

    ``rows_per_request``: the most rows one request carries (the endpoint's body limit); each call's
    rows are split over the active keys as evenly as that allows. ``natural`` and ``natural_share``:
    the pool of cover records and their share of every request's rows (0 for none).
    """

    def __init__(self, connect: Callable[[str], HTTPTarget], keys: Sequence[str], n_classes: int, *,
                 active: int = 1, rows_per_request: int = 256, natural: np.ndarray | None = None,
                 natural_share: float = 0.0, seed: int = 0, budget: int | None = None):
        super().__init__(n_classes, budget)
        if not 1 <= active <= len(keys):
            raise ValueError(f"active must be between 1 and the {len(keys)} keys")
        if not 0.0 <= natural_share < 1.0 or (natural_share > 0 and natural is None):
            raise ValueError("natural_share must be in [0, 1), with a pool of natural records")
        self.connect, self.active, self.rows_per_request = connect, active, rows_per_request
        self.natural, self.natural_share = natural, natural_share
        self._spare = deque(keys)
        self._live: deque[str] = deque()
        self._targets: dict[str, HTTPTarget] = {}
        self._rng = np.random.default_rng(seed)
        self._probabilities: bool | None = None
        self.burned: list[str] = []
        self.spent = self.lost = self.cover = 0
        self.events: dict[str, int | None] = {"throttled_at": None, "degraded_at": None, "blocked_at": None}
        self._fill()

    @property
    def returns_probabilities(self) -> bool:
        if self._probabilities is None:
            key = self._live[0]
            self._probabilities = self._key_target(key).returns_probabilities
            self.spent += 1
        return self._probabilities

    @property
    def cost(self) -> AttackerCost:
        return AttackerCost(len(self._targets), len(self.burned), self.spent, self.lost, self.cover)

    def close(self) -> None:
        for target in self._targets.values():
            target.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _query(self, X: np.ndarray) -> np.ndarray:
        answered = self.queries - len(X)
        size = min(self.rows_per_request, -(-len(X) // self.active))
        parts = []
        try:
            for rows in np.array_split(X, range(size, len(X), size)):
                parts.append(self._send(rows, answered))
                answered += len(rows)
        finally:
            self.queries = answered  # the rows answered, should the keys run out
        return np.concatenate(parts)

    def _send(self, rows: np.ndarray, answered: int) -> np.ndarray:
        """``rows``' answers, through the next live key; a sanctioned key is burned and the rows resent."""
        while True:
            key = self._live[0]
            self._live.rotate(-1)
            sent, own = self._with_cover(rows)
            try:
                answers = self._key_target(key).answer(sent)
            except (TargetBlocked, TargetThrottled) as error:
                self._burn(key, "blocked_at" if isinstance(error, TargetBlocked) else "throttled_at", answered,
                           len(sent))
                continue
            self.spent += len(sent)
            self.cover += len(sent) - len(rows)
            if self._probabilities is None:
                self._probabilities = answers.ndim == 2
            if self._probabilities and answers.ndim == 1:  # the degraded output: labels only
                self.lost += len(sent)
                self._burn(key, "degraded_at", answered, 0)
                continue
            return answers[own]

    def _with_cover(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` shuffled among cover records (their share ``natural_share``), and where ``rows`` are."""
        if not self.natural_share:
            return rows, np.arange(len(rows))
        extra = round(len(rows) * self.natural_share / (1.0 - self.natural_share))
        cover = self.natural[self._rng.integers(len(self.natural), size=extra)]
        order = self._rng.permutation(len(rows) + extra)
        return np.concatenate([rows, cover])[order], np.argsort(order)[: len(rows)]

    def _burn(self, key: str, event: str, answered: int, refused: int) -> None:
        """Drop ``key`` for good (``refused`` rows were sent and not answered) and bring in a fresh one."""
        self.spent += refused
        self.lost += refused
        if self.events[event] is None:
            self.events[event] = answered
        self.burned.append(key)
        self._live.remove(key)
        self._fill()
        if not self._live:
            raise KeysExhausted(403, "", answered, dict(self.events))

    def _fill(self) -> None:
        while len(self._live) < self.active and self._spare:
            self._live.append(self._spare.popleft())

    def _key_target(self, key: str) -> HTTPTarget:
        if key not in self._targets:
            self._targets[key] = self.connect(key)
        return self._targets[key]
