"""HopSkipJump: the L2 distance from each point to the nearest decision boundary, from labels alone.

Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack", IEEE S&P
2020 (untargeted, L2), vectorised over a batch of points:

- initialisation (sec. 5, "Initialization"): uniform random points of the feature box until one is
  labelled otherwise, then a binary search towards the point (Algorithm 1, ``Bin-Search``);
- each iteration ``t`` (Algorithm 2): the gradient direction of the boundary at the current boundary
  point from ``B_t = B_0 sqrt(t)`` random unit probes at radius ``delta_t = sqrt(d) theta
  ||x_{t-1} - x*||`` (sec. 4.2, the baseline-corrected estimate of eq. 16; ``delta_1`` is a tenth of
  the box), a geometric step of size ``||x_t - x*|| / sqrt(t)`` halved until it stays across the
  boundary (sec. 5, "Step size search"), and a binary search back to the boundary to tolerance
  ``theta = gamma / d^(3/2)`` (sec. 5, "Hyper-parameters").

``labels_of`` maps ``(*batch, *extra, d)`` points to their ``(*batch, *extra)`` labels, so the same code
searches a target (``batch = (n,)``) and every reference model of an ensemble at once (``batch =
(models, n)``, model ``i`` labelling ``points[i]``). Iterations stop before any point's queries could
exceed ``max_queries``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Labeller = Callable[[np.ndarray], np.ndarray]

MAX_HALVINGS = 10
"""The most halvings of a geometric step (sec. 5) before the iteration keeps its boundary point."""


@dataclass(frozen=True)
class HopSkipJump:
    """The search's parameters: ``max_queries`` per point (the budget), ``initial_samples`` (``B_0``,
    100 in the paper), ``init_tries`` random starts, ``gamma`` (``theta = gamma / d^(3/2)``) and the
    feature box ``[low, high]``."""

    max_queries: int = 1000
    initial_samples: int = 100
    init_tries: int = 20
    gamma: float = 1.0
    low: float = 0.0
    high: float = 1.0
    seed: int = 0

    def distances(self, labels_of: Labeller, X: np.ndarray, y: np.ndarray,
                  chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """The L2 distance from each of ``X`` (``(*batch, d)``, the points along the last batch axis, of
        labels ``y``) to the boundary HopSkipJump finds (0 where it is not labelled ``y``; the box's
        diagonal where no start crossed the boundary), and the queries spent per point (``(n,)``).
        Points are searched ``chunk`` at a time; the random starts and probes of a point depend only
        on ``seed`` and its position, so every model of a leading batch axis, and a separate call on
        one model, draw the same ones (common random numbers for per-example calibration)."""
        X = np.asarray(X, dtype=np.float64)
        parts = [self._search(labels_of, X[..., start:start + chunk, :], y[start:start + chunk], start)
                 for start in range(0, X.shape[-2], chunk)]
        return (np.concatenate([distance for distance, _ in parts], axis=-1),
                np.concatenate([np.full(len(y[start:start + chunk]), spent)
                                for start, (_, spent) in zip(range(0, X.shape[-2], chunk), parts)]))

    def _search(self, labels_of: Labeller, X: np.ndarray, y: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, offset])
        d = X.shape[-1]
        theta = self.gamma / d ** 1.5
        bisections = int(np.ceil(np.log2(1.0 / theta)))
        correct = labels_of(X) == y
        spent = 1
        starts = np.broadcast_to(rng.uniform(self.low, self.high, (len(y), self.init_tries, d)),
                                 (*X.shape[:-1], self.init_tries, d))
        crossed = labels_of(starts) != y[..., None]
        spent += self.init_tries
        found = crossed.any(axis=-1)
        first = np.take_along_axis(starts, crossed.argmax(axis=-1)[..., None, None], axis=-2)[..., 0, :]
        adversarial = np.where(found[..., None], first, X)
        boundary = self._bisect(labels_of, X, y, adversarial, bisections)
        spent += bisections
        distance = np.linalg.norm(boundary - X, axis=-1)
        for t in range(1, 1 + 10_000):
            samples = int(self.initial_samples * np.sqrt(t))
            if spent + samples + MAX_HALVINGS + bisections > self.max_queries:
                break
            delta = (np.full(distance.shape, 0.1 * (self.high - self.low)) if t == 1
                     else np.maximum(np.sqrt(d) * theta * distance, 1e-6))
            direction = self._gradient_direction(labels_of, boundary, y, delta, samples, rng)
            spent += samples
            step = distance / np.sqrt(t)
            candidate, halvings = self._geometric_step(labels_of, boundary, y, direction, step)
            spent += halvings
            boundary = self._bisect(labels_of, X, y, candidate, bisections)
            spent += bisections
            distance = np.linalg.norm(boundary - X, axis=-1)
        diagonal = np.sqrt(d) * (self.high - self.low)
        return np.where(correct, np.where(found, distance, diagonal), 0.0), spent

    def _bisect(self, labels_of: Labeller, X: np.ndarray, y: np.ndarray, adversarial: np.ndarray,
                steps: int) -> np.ndarray:
        """Algorithm 1: the point on the segment from ``X`` to ``adversarial`` just across the boundary,
        after ``steps`` halvings of the blend (``theta`` tolerance)."""
        inside, outside = np.zeros(X.shape[:-1]), np.ones(X.shape[:-1])
        for _ in range(steps):
            middle = (inside + outside) / 2
            across = labels_of(X + middle[..., None] * (adversarial - X)) != y
            inside, outside = np.where(across, inside, middle), np.where(across, middle, outside)
        return X + outside[..., None] * (adversarial - X)

    def _gradient_direction(self, labels_of: Labeller, boundary: np.ndarray, y: np.ndarray, delta: np.ndarray,
                            samples: int, rng: np.random.Generator) -> np.ndarray:
        """Sec. 4.2, eq. 16: the mean of the probes' unit directions weighted by (phi - mean phi), where
        phi is +1 across the boundary and -1 on the point's side; the probes are clipped to the box,
        so their directions are taken after clipping. Unit length."""
        probes = rng.standard_normal((len(y), samples, boundary.shape[-1]))  # shared by a leading models axis
        probes /= np.linalg.norm(probes, axis=-1, keepdims=True)
        points = np.clip(boundary[..., None, :] + delta[..., None, None] * probes, self.low, self.high)
        units = (points - boundary[..., None, :]) / delta[..., None, None]
        phi = np.where(labels_of(points) != y[..., None], 1.0, -1.0)
        mean = phi.mean(axis=-1, keepdims=True)
        weights = np.where(np.abs(mean) == 1.0, phi, phi - mean)  # all on one side: no baseline (as sec. 4.2)
        direction = (weights[..., None] * units).sum(axis=-2)
        return direction / np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)

    def _geometric_step(self, labels_of: Labeller, boundary: np.ndarray, y: np.ndarray, direction: np.ndarray,
                        step: np.ndarray) -> tuple[np.ndarray, int]:
        """Sec. 5: ``boundary + step * direction``, the step halved until the point is across the
        boundary (at most ``MAX_HALVINGS``; a point never across keeps ``boundary``), and the queries."""
        accepted, pending = boundary.copy(), np.ones(boundary.shape[:-1], bool)
        for halving in range(MAX_HALVINGS):
            candidate = np.clip(boundary + step[..., None] * direction, self.low, self.high)
            across = labels_of(candidate) != y
            accepted = np.where((pending & across)[..., None], candidate, accepted)
            pending &= ~across
            step = step / 2
            if not pending.any():
                return accepted, halving + 1
        return accepted, MAX_HALVINGS
