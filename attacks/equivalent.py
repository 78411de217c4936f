"""Functionally equivalent extraction of a one-hidden-layer ReLU network from its confidences
(Jagielski, Carlini, Berthelot, Kurakin & Papernot, "High Accuracy and High Fidelity Extraction of
Neural Networks", USENIX Security 2020, sec. 5; after Milli et al., "Model Reconstruction from Model
Explanations", FAT* 2019).

The logit differences ``g(x) = log p(x)[1:] - log p(x)[0]`` of ``A relu(W x + b) + c`` are piecewise
linear in ``x``, with a kink wherever a hidden unit's pre-activation crosses zero. The attack:

1. *critical points* (sec. 5.2): along random segments of the feature box, ``g`` is sampled on a grid;
   where its second difference is not zero a kink lies near, and it is located where the slopes on
   both sides meet (checked with one more query; a segment holding several kinks is halved);
2. *weights up to scale* (sec. 5.3): symmetric second differences at a critical point give the
   unit's hyperplane normal roughly; stepped along it to both sides, the Jacobian of ``g`` (finite
   differences) jumps by ``a_i w_i^T``, rank one, whose right singular vector is the unit's weight row
   ``w_i`` up to scale and sign, and ``b_i = -w_i . x*``. Kinks where a known unit's hyperplane meets
   the segment are not measured again;
3. *the output layer* (sec. 5.4) by least squares on every answer received. The paper recovers each
   unit's sign; here it is not needed: ``relu(-z) = relu(z) - z``, so a unit of the wrong sign only adds
   a linear term, and the copy ``A' relu(W' x + b') + L x + c'`` with a linear skip ``L`` solved with the
   rest represents the target exactly.

Needs probabilities at full precision: rounding or noise hides the kinks (a defence that works), and
against labels only it raises ``OutputUnavailable`` before spending queries.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.base import Attack, AttackResult
from attacks.extraction import Labeller, _labels_of, _result, labeller
from attacks.scoring import agreement
from attacks.targets import OutputUnavailable, Target


class EquivalentCopy(nn.Module):
    """``[0, relu(x W^T + b) A + x L + c]``: logits whose differences are the extracted ``g``."""

    def __init__(self, W: np.ndarray, b: np.ndarray, theta: np.ndarray):
        super().__init__()
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        self.hidden = nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
        with torch.no_grad():
            self.hidden.weight.copy_(as_tensor(W))
            self.hidden.bias.copy_(as_tensor(b))
        self.register_buffer("theta", as_tensor(theta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        features = torch.cat([torch.relu(self.hidden(x)), x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        differences = features @ self.theta
        return torch.cat([torch.zeros(len(x), 1, dtype=torch.float64), differences], dim=1)


class FunctionallyEquivalent(Attack):
    """Jagielski et al. 2020, sec. 5, against a one-hidden-layer ReLU target with ``hidden`` units (the
    attacker's knowledge of the architecture; ``None``: unknown, the search stops when a batch of
    segments finds no new unit). ``segments`` are searched ``per_batch`` at a time, each sampled at
    ``grid`` points, until every unit is found or ``max_queries`` are spent."""

    name = "functionally-equivalent"

    def __init__(self, hidden: int | None = None, *, grid: int = 257, per_batch: int = 4, max_queries: int = 60_000,
                 step: float = 3e-3, seed: int = 0):
        self.hidden = hidden
        self.grid = grid
        self.per_batch = per_batch
        self.max_queries = max_queries
        self.step = step
        self.seed = seed

    def run(self, target: Target, X_test: np.ndarray, y_test: np.ndarray | None = None, *,
            aux: np.ndarray | None = None, oracle: Labeller | None = None) -> AttackResult:
        if not target.returns_probabilities:
            raise OutputUnavailable(f"{self.name} needs probabilities: the target returns labels only")
        start = target.queries
        search = _Search(target, X_test.shape[1], self.step, np.random.default_rng(self.seed), aux)
        quiet = 0
        while target.queries - start < self.max_queries and quiet < 2:
            found = search.batch(self.per_batch, self.grid)
            quiet = 0 if found else quiet + 1
            if self.hidden is not None and len(search.units) >= self.hidden:
                break
        copy, residual = search.fit()
        oracle = _labels_of(oracle, target)
        spent = target.queries - start
        curve = {"queries": [spent], "agreement": [agreement(labeller(copy)(X_test), oracle(X_test))]}
        return _result(self.name, copy, spent, curve, oracle, X_test, y_test,
                       units_found=float(len(search.units)), fit_residual=residual)


class _Search:
    """The attack's state: every query and answer so far, and the units found."""

    def __init__(self, target: Target, d: int, step: float, rng: np.random.Generator, pool: np.ndarray | None):
        self.target, self.d, self.step, self.rng, self.pool = target, d, step, rng, pool
        self.X: list[np.ndarray] = []
        self.G: list[np.ndarray] = []
        self.units: list[tuple[np.ndarray, float]] = []  # unit weight row (norm 1), bias

    def g(self, X: np.ndarray) -> np.ndarray:
        """Logit differences of the answers to ``X``, clipped to the box (both kept for the final fit)."""
        X = np.clip(X, 0.0, 1.0)
        P = self.target.predict_proba(X)
        logs = np.log(np.clip(P.astype(np.float64), 1e-300, None))
        G = logs[:, 1:] - logs[:, :1]
        self.X.append(X)
        self.G.append(G)
        return G

    def batch(self, segments: int, grid: int) -> int:
        """Search ``segments`` new segments; the number of new units found."""
        starts, ends = self._endpoints(segments), self._endpoints(segments)
        t = np.linspace(0.0, 1.0, grid)
        points = starts[:, None, :] + t[None, :, None] * (ends - starts)[:, None, :]
        G = self.g(points.reshape(-1, self.d)).reshape(segments, grid, -1)
        kinks = []
        for s in range(segments):
            for a, b in _kink_intervals(G[s], t):
                kinks.append((s, a, b))
        located = self._locate(kinks, starts, ends, depth=4)
        new = 0
        for s, at in located:
            x = starts[s] + at * (ends[s] - starts[s])
            if self._on_known_hyperplane(x):
                continue
            unit = self._measure(x)
            if unit is not None and not self._is_known(unit):
                self.units.append(unit)
                new += 1
        return new

    def _endpoints(self, n: int) -> np.ndarray:
        """Segment ends: records of the attacker's own pool (where the data lives, so the units that
        matter there bend the segments), moved a tenth of the way to a point inside the box so that the
        probes around a critical point stay in the box; else points drawn uniformly from the box, 2% of
        its width away from its faces for the same reason."""
        if self.pool is None:
            return 0.02 + 0.96 * self.rng.random((n, self.d))
        records = np.asarray(self.pool, dtype=np.float64)[self.rng.integers(len(self.pool), size=n)]
        return 0.9 * records + 0.1 * (0.25 + 0.5 * self.rng.random((n, self.d)))

    def _locate(self, kinks: list[tuple[int, float, float]], starts: np.ndarray, ends: np.ndarray,
                depth: int) -> list[tuple[int, float]]:
        """Each interval's kink where the slopes on its two sides meet, confirmed by one more query;
        an interval whose prediction fails holds several kinks and is halved (``depth`` times at most)."""
        if not kinks or depth == 0:
            return []
        delta = 1e-4
        segment = np.array([k[0] for k in kinks])
        a, b = np.array([k[1] for k in kinks]), np.array([k[2] for k in kinks])
        origin, span = starts[segment], ends[segment] - starts[segment]

        def along(t: np.ndarray) -> np.ndarray:  # points at ``t`` (one per kink, or (kinks, k)) on their segments
            return origin[:, None, :] + t.reshape(len(kinks), -1)[:, :, None] * span[:, None, :]

        G = self.g(along(np.stack([a, a + delta, b - delta, b], axis=1)).reshape(-1, self.d)).reshape(len(kinks), 4, -1)
        slope_a, slope_b = (G[:, 1] - G[:, 0]) / delta, (G[:, 3] - G[:, 2]) / delta
        gap = slope_a - slope_b
        rhs = G[:, 3] - G[:, 0] + slope_a * a[:, None] - slope_b * b[:, None]
        at = (gap * rhs).sum(axis=1) / np.maximum((gap * gap).sum(axis=1), 1e-300)
        inside = (at > a) & (at < b) & ((gap * gap).sum(axis=1) > 0)
        observed = self.g(along(np.clip(at, 0, 1))[:, 0])
        predicted = G[:, 0] + slope_a * (at - a)[:, None]
        scale = 1.0 + np.abs(observed).max(axis=1)
        confirmed = inside & (np.abs(observed - predicted).max(axis=1) < 1e-3 * scale)
        found = [(kinks[i][0], float(at[i])) for i in np.flatnonzero(confirmed)]
        halves = [half for i in np.flatnonzero(~confirmed) if b[i] - a[i] > 1e-3
                  for half in ((kinks[i][0], a[i], (a[i] + b[i]) / 2), (kinks[i][0], (a[i] + b[i]) / 2, b[i]))]
        return found + self._locate(halves, starts, ends, depth - 1)

    def _measure(self, x: np.ndarray) -> tuple[np.ndarray, float] | None:
        """The unit whose hyperplane passes through the critical point ``x`` (sec. 5.3). Symmetric second
        differences along each axis, ``g(x + e) + g(x - e) - 2 g(x) = a |w . e|`` (only that unit bends
        there), give ``|w_j|``; along the sum of an axis and the largest one's, the signs. The jump of the
        Jacobian across the hyperplane, stepped along that normal, then gives ``w`` exactly: it must be
        rank one (else another unit's hyperplane is too near, and None)."""
        rough = self._normal(x)
        if rough is None:
            return None
        jump = self._jacobian(x + self.step * rough) - self._jacobian(x - self.step * rough)
        _, singular, right = np.linalg.svd(jump, full_matrices=False)
        if singular[0] <= 0 or (len(singular) > 1 and singular[1] > 0.05 * singular[0]):
            return None
        weights = right[0] * np.sign(right[0] @ rough)
        return weights, float(-weights @ x)

    def _normal(self, x: np.ndarray) -> np.ndarray | None:
        """The hyperplane's unit normal at ``x`` from second differences (up to sign)."""
        d, e = self.d, self.step
        axes = np.eye(d) * e
        pivot_rows = np.vstack([x, x + axes, x - axes])
        G = self.g(pivot_rows)
        bends = G[1:d + 1] + G[d + 1:] - 2 * G[0]
        _, singular, right = np.linalg.svd(bends, full_matrices=False)
        if singular[0] <= 0:
            return None
        along = right[0]
        size = np.abs(bends @ along)
        pivot = int(size.argmax())
        pairs = axes + axes[pivot]
        H = self.g(np.vstack([x + pairs, x - pairs]))
        joint = np.abs((H[:d] + H[d:] - 2 * G[0]) @ along)
        same = np.abs(joint - (size[pivot] + size)) <= np.abs(joint - np.abs(size[pivot] - size))
        normal = np.where(same, size, -size)
        normal[pivot] = size[pivot]
        return normal / np.linalg.norm(normal)

    def _jacobian(self, x: np.ndarray) -> np.ndarray:
        """``dg/dx`` at ``x`` by forward differences of a tenth of the step, each towards the box's inside."""
        h = self.step / 10
        signs = np.where(x < 0.5, 1.0, -1.0)
        X = np.vstack([x, x + np.diag(signs * h)])
        G = self.g(X)
        return ((G[1:] - G[0]) / (signs * h)[:, None]).T

    def _on_known_hyperplane(self, x: np.ndarray) -> bool:
        return any(abs(weights @ x + bias) < 10 * self.step for weights, bias in self.units)

    def _is_known(self, unit: tuple[np.ndarray, float]) -> bool:
        return any(weights @ unit[0] > 0.999 and abs(bias - unit[1]) < 1e-2 for weights, bias in self.units)

    def fit(self) -> tuple[EquivalentCopy, float]:
        """The output layer and linear skip by least squares on every answer; the largest residual."""
        X, G = np.vstack(self.X), np.vstack(self.G)
        exact = (np.abs(G) < 600).all(axis=1)  # answers with no probability rounded or underflowed to 0
        if exact.sum() > len(self.units) + self.d + 1:
            X, G = X[exact], G[exact]
        W = np.array([w for w, _ in self.units]).reshape(-1, self.d)
        b = np.array([bias for _, bias in self.units])
        features = np.hstack([np.maximum(X @ W.T + b, 0.0), X, np.ones((len(X), 1))])
        theta, *_ = np.linalg.lstsq(features, G, rcond=None)
        residual = float(np.abs(features @ theta - G).max())
        return EquivalentCopy(W, b, theta), residual


def _kink_intervals(G: np.ndarray, t: np.ndarray) -> list[tuple[float, float]]:
    """Intervals of the grid ``t`` where ``G`` (one row per point) is not linear: runs of points whose
    second difference exceeds the answers' precision, each widened by a grid step on both sides."""
    second = np.abs(G[:-2] - 2 * G[1:-1] + G[2:]).max(axis=1)
    tolerance = 1e-5 * (1.0 + np.abs(G).max())
    bent = np.flatnonzero(second > tolerance) + 1
    intervals: list[tuple[float, float]] = []
    for i in bent:
        a, b = t[i - 1], t[i + 1]
        if intervals and a <= intervals[-1][1]:
            intervals[-1] = (intervals[-1][0], b)
        else:
            intervals.append((a, b))
    return intervals
