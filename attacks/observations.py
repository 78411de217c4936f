"""What a calibrated membership attack reads off the target, and off its reference models, for each
kind of output defence: the adaptive halves of LiRA (Carlini et al., S&P 2022, sec. IV, Alg. 1).

LiRA fits, per candidate, Gaussians to a statistic of the reference models' outputs and scores the
target's value of that statistic under them. An ``Observation`` says how that statistic is obtained
when the API defends its answers, knowing the defence's kind and public parameters (Kerckhoffs),
never its secret:

- ``Published``: the answer as published, with the references' outputs passed through the same public
  format (rounding, top-k): the adaptive LiRA of sec. VI-A.
- ``RoundedInterval``: a rounded answer only says the confidence lies in an interval; its likelihood
  is the Gaussian mass of that interval, not the density at a point.
- ``InvertedReverseSigmoid``: the reverse sigmoid of Lee et al. (2019) is a known row-wise function;
  it is inverted exactly (parameters known, or estimated from 300 of the answers) and LiRA runs on the
  recovered confidences.
- ``AveragedNoise``: a randomised answer is averaged over inputs the model cannot tell apart (the same
  record moved by a few ulps), at the smallest perturbation scale that draws fresh noise; the
  references' outputs get the same noise, averaged over as many draws.
- ``LabelRobustness``: against labels only, the fraction of noisy copies the target still labels
  correctly (Choquette-Choo et al., ICML 2021, sec. 4), calibrated per example by the references
  computing the same fraction on the same copies.

Each returns a ``Measurement``: the observed statistic as an interval ``[low, high]`` per view and
candidate (``low == high`` for a point), the references' statistic, and what it learnt.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit, logsumexp

from attacks.ensemble import Ensemble
from attacks.targets import OutputFormat, OutputUnavailable, Target


@dataclass
class Measurement:
    """``low``/``high``: ``(views, n)`` bounds of the target's statistic; ``reference``: ``(models,
    views, n)`` the references' statistic; ``learnt``: what the observation found out about the
    defence (numbers, reported as metrics); ``artefacts``: anything else it made."""

    low: np.ndarray
    high: np.ndarray
    reference: np.ndarray
    learnt: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Any] = field(default_factory=dict)


class Observation(ABC):
    """One way to read LiRA's statistic off a defended target and off the reference models."""

    @abstractmethod
    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        """The statistic of the ``(views, n, d)`` queries of candidates labelled ``y``."""


def observe(target: Target, X: np.ndarray, output: OutputFormat) -> np.ndarray:
    """The target's ``(n, k)`` answers: probabilities, or one-hot rows when it returns labels only."""
    if output.label_only or not target.returns_probabilities:
        return np.eye(target.n_classes)[target.predict(X)]
    return target.predict_proba(X)


def scaled_logit(probabilities: np.ndarray, labels: np.ndarray, output: OutputFormat = OutputFormat()) -> np.ndarray:
    """``log p_y - log sum_{y' != y} p_y'`` (Carlini et al. 2022, sec. IV-C) for ``(..., n, k)`` outputs,
    the sum taken term by term rather than as ``1 - p_y`` (exact when it is tiny); both terms are
    floored at half a rounding step (or 1e-30) to stay finite."""
    floor = 0.5 * 10.0 ** -output.rounding if output.rounding is not None else 1e-30
    index = np.broadcast_to(labels, probabilities.shape[:-1])[..., None]
    true = np.take_along_axis(probabilities, index, axis=-1)[..., 0]
    others = probabilities.copy()
    np.put_along_axis(others, index, 0.0, axis=-1)
    return np.log(np.maximum(true, floor)) - np.log(np.maximum(others.sum(axis=-1), floor))


def _ask(target: Target, views: np.ndarray) -> np.ndarray:
    """``(views, n, k)`` probabilities of ``(views, n, d)`` queries, in one batch."""
    if not target.returns_probabilities:
        raise OutputUnavailable("this observation needs scores; against labels only use LabelRobustness")
    return target.predict_proba(views.reshape(-1, views.shape[-1])).reshape(*views.shape[:2], -1)


def _reference_probabilities(references: Ensemble, views: np.ndarray) -> np.ndarray:
    """``(models, views, n, k)`` probabilities of every reference model."""
    flat = references.predict_proba(views.reshape(-1, views.shape[-1]))
    return flat.reshape(len(references), *views.shape[:2], -1)


@dataclass(frozen=True)
class Published(Observation):
    """The scaled logit of the published answer; the references' outputs pass through the same public
    ``output`` format first (Carlini et al. 2022, sec. VI-A: the attacker mimics the API)."""

    output: OutputFormat = OutputFormat()

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        if self.output.label_only:
            raise OutputUnavailable("LiRA on published scores needs scores; against labels only use LabelRobustness")
        observed = scaled_logit(_ask(target, views), y, self.output)
        published = self.output.apply(_reference_probabilities(references, views).reshape(-1, target.n_classes))
        reference = scaled_logit(published.reshape(len(references), *views.shape[:2], -1), y, self.output)
        return Measurement(observed, observed, reference)


@dataclass(frozen=True)
class RoundedInterval(Observation):
    """Answers rounded to ``decimals`` places: the true confidence ``p_y`` lies within one unit
    ``10^-decimals`` of the published one (rows apportioned to sum to 1 move an entry by less than a
    unit), so the observation is the interval of ``logit(p_y)`` it allows; the references' statistic
    is their exact ``logit(p_y)``. The likelihood is then the Gaussian mass of the interval."""

    decimals: int

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        answers = _ask(target, views)
        published = np.take_along_axis(answers, np.broadcast_to(y, answers.shape[:-1])[..., None], axis=-1)[..., 0]
        unit = 10.0 ** -self.decimals
        with np.errstate(divide="ignore"):
            low = logit(np.clip(published - unit, 0.0, 1.0))
            high = logit(np.clip(published + unit, 0.0, 1.0))
        reference = scaled_logit(_reference_probabilities(references, views), y)
        return Measurement(low, high, reference)


def _perturbed(z: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """``f(p) = p - beta (sigmoid(gamma logit p) - 1/2)`` of the confidence whose logit is ``z``."""
    return expit(z) - beta * (expit(gamma * z) - 0.5)


def reverse_sigmoid(probabilities: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """The perturbation of Lee et al. 2019 (sec. III) as the attacker writes it down: ``f`` of each
    confidence, clipped at 0, renormalised (without the top-label swap an API may add in the rare rows
    where the perturbation moves the top)."""
    with np.errstate(divide="ignore"):
        z = logit(np.asarray(probabilities, dtype=np.float64))
    q = np.maximum(_perturbed(z, beta, gamma), 0.0)
    return q / q.sum(axis=-1, keepdims=True)


def _monotone_pieces(beta: float, gamma: float, bound: float = 100.0,
                     points: int = 400_001) -> list[tuple[np.ndarray, np.ndarray]]:
    """``f`` over logits in ``[-bound, bound]`` cut where it turns: ``(f, z)`` per piece, ``f`` ascending."""
    z = np.linspace(-bound, bound, points)
    f = _perturbed(z, beta, gamma)
    step = np.diff(f)
    slope = np.sign(step) * (np.abs(step) > 8 * np.finfo(float).eps * np.abs(f[1:]))
    moving = np.flatnonzero(slope)  # flat stretches (f saturated in float64, or rounding noise) do not turn
    turns = moving[1:][slope[moving[1:]] != slope[moving[:-1]]]
    pieces = []
    for part_z, part_f in zip(np.split(z, turns), np.split(f, turns)):
        order = np.argsort(part_f, kind="stable")
        pieces.append((part_f[order], part_z[order]))
    return pieces


def _assignments(q: np.ndarray, pieces: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Which monotone piece of ``f`` each entry of each row lies on, ``(n, k)`` per hypothesis, the most
    confident first: the top on a piece reaching ``p >= 1/k`` (the highest first); the other entries
    on the first piece (or the second where the first cannot reach their value), except one of them,
    or the two or three with the smallest answers (``f`` is lowest in the middle), on another piece
    below 1/2."""
    n, k = q.shape
    top = q.argmax(axis=1)
    top_pieces = [i for i, (_, z) in enumerate(pieces) if z.max() >= logit(1.0 / k)][::-1]
    other_pieces = [i for i, (_, z) in enumerate(pieces) if i > 0 and z.min() <= 0]
    ranked = np.argsort(np.where(np.arange(k) == top[:, None], np.inf, q), axis=1)
    movers = [np.zeros((n, k), dtype=bool)] + [np.arange(k)[None].repeat(n, 0) == j for j in range(k)]
    for count in (2, 3):
        mover = np.zeros((n, k), dtype=bool)
        np.put_along_axis(mover, ranked[:, :count], True, axis=1)
        movers.append(mover)
    assignments = []
    for top_piece in top_pieces:
        for other_piece in other_pieces:
            for mover in movers:
                piece = np.where(mover, other_piece, 0)
                piece[np.arange(n), top] = top_piece
                assignments.append(piece)
    return assignments


def invert_reverse_sigmoid(answers: np.ndarray, beta: float, gamma: float,
                           grid: int = 128, steps: int = 50) -> np.ndarray:
    """The most confident ``p`` with ``reverse_sigmoid(p) == answers``, row by row (NaN rows where
    there is none).

    ``f`` is monotone in pieces (for ``gamma < 1``: falling from ``beta/2`` near 0, rising through the
    middle, falling again towards 1), so an answer ``q_i = f(p_i) / S`` (``S`` the unknown normaliser)
    has one preimage per piece. For each assignment of entries to pieces (``_assignments``, most
    confident first), ``sum_{i != top} p_i = 1 - p_top`` (both sides from logits, exact near certainty)
    is solved for ``S``: the sign change on a grid of ``S`` with the smallest jump, then bisection.
    Some answers have several preimages (a confident row, and a less confident one with a runner-up
    class); the first found, the most confident, is the one a trained model gives far more often."""
    q = np.asarray(answers, dtype=np.float64)
    n, k = q.shape
    pieces = _monotone_pieces(beta, gamma)
    floors, ceilings = np.array([f[0] for f, _ in pieces]), np.array([f[-1] for f, _ in pieces])
    spill = 1 if len(pieces) > 1 else 0  # the piece an entry of the first overflows into
    recovered = np.full((n, k), np.nan)
    for assignment in _assignments(q, pieces):
        todo = np.flatnonzero(np.isnan(recovered[:, 0]))
        if len(todo) == 0:
            break
        p, solved = _solve_normaliser(q[todo], assignment[todo], pieces, floors, ceilings, spill, grid, steps)
        recovered[todo[solved]] = p[solved]
    return recovered


def _solve_normaliser(q: np.ndarray, piece: np.ndarray, pieces: list[tuple[np.ndarray, np.ndarray]],
                      floors: np.ndarray, ceilings: np.ndarray, spill: int, grid: int,
                      steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``invert_reverse_sigmoid`` under one assignment of entries to pieces: the rows' ``p`` and
    which rows it solves."""
    n, k = q.shape
    rows = np.arange(n)
    top = q.argmax(axis=1)
    is_top = np.arange(k) == top[:, None]
    low = np.max(floors[piece] / np.maximum(q, 1e-300), axis=1)
    high = np.min(ceilings[np.where(piece == 0, spill, piece)] / np.maximum(q, 1e-300), axis=1)

    def logits(scale: np.ndarray) -> np.ndarray:
        values = scale[..., None] * (q[:, None] if scale.ndim == 2 else q)
        where = np.broadcast_to(piece[:, None] if scale.ndim == 2 else piece, values.shape)
        where = np.where((where == 0) & (values > ceilings[0]), spill, where)
        z = np.empty(values.shape)
        for index, (f, zs) in enumerate(pieces):
            on = where == index
            z[on] = np.interp(values[on], f, zs)
        return z

    def excess(z: np.ndarray) -> np.ndarray:
        """``sum_{i != top} p_i - (1 - p_top)``: zero for a distribution."""
        mask = np.broadcast_to(is_top[:, None] if z.ndim == 3 else is_top, z.shape)
        return np.where(mask, -expit(-z), expit(z)).sum(axis=-1)

    # S where the first piece's largest answer reaches that piece's end (p -> 0): the sum of the tiny
    # confidences varies there over many orders of magnitude, so the grid is geometric towards it
    critical = np.clip(ceilings[0] / np.where(piece == 0, q, 0).max(axis=1).clip(1e-300), low, high)
    towards = 1 - np.logspace(-15, 0, grid // 2)[::-1]
    scales = np.concatenate([low[:, None] + (critical - low)[:, None] * towards[None],
                             critical[:, None] + np.clip(high - critical, 0, None)[:, None]
                             * np.linspace(0, 1, grid // 2)[None]], axis=1)
    values = excess(logits(scales))
    crossing = np.sign(values[:, :-1]) != np.sign(values[:, 1:])
    jump = np.abs(values[:, :-1]) + np.abs(values[:, 1:])  # small at a root, large at a discontinuity
    first = np.where(crossing, jump, np.inf).argmin(axis=1)
    a, b = scales[rows, first], scales[rows, first + 1]
    sign_a = np.sign(values[rows, first])
    for _ in range(steps):
        middle = (a + b) / 2
        same = np.sign(excess(logits(middle))) == sign_a
        a, b = np.where(same, middle, a), np.where(same, b, middle)
    z = logits((a + b) / 2)
    residual = np.abs(excess(z)) < 1e-9 * expit(-z[rows, top]) + 1e-15
    p = np.where(is_top, 0.0, expit(z))
    p[rows, top] = 1.0 - p.sum(axis=1)
    return p, (high > low) & crossing.any(axis=1) & residual


def estimate_reverse_sigmoid(answers: np.ndarray, references: np.ndarray, margin: float = 0.01,
                             tolerance: float = 0.005, steps: int = 10) -> tuple[float, float]:
    """``(beta, gamma)`` of the reverse sigmoid from its ``(n, k)`` ``answers`` and the reference
    models' ``(models, n, k)`` probabilities on the same inputs.

    A row's answer fits confidences under almost any ``(beta, gamma)`` (k - 1 unknowns and the
    normaliser for k - 1 numbers), so matching the references' outputs alone leaves gamma 5-10% off
    (the target's tiny confidences are not the references'), and LiRA does not survive that error.
    What pins gamma down is where rows stop having any preimage: with beta at or a little above the
    true one, every row inverts up to the true gamma and some fail beyond it (rows that invert at no
    gamma, such as those whose top the API swapped back, aside). So: beta and a first
    gamma from the references (``_matching_start``), beta raised by ``margin`` (above the true one:
    the start is within 1%), then the largest gamma at which all but ``tolerance`` of the rows still
    invert (a few odd rows fail below the true gamma too), by bisection
    in ``steps`` halvings (the start's gamma kept if no gamma in reach fails). On the digits MLP, 300
    rows give beta within 1% and gamma within 0.3-3.5% for five settings from (0.33, 0.23) to
    (1.05, 0.83), in 6-15 s."""
    answers = np.asarray(answers, dtype=np.float64)
    beta, gamma = _matching_start(answers, references)
    beta *= 1 + margin
    lowest = 0.5 * gamma
    never = np.isnan(invert_reverse_sigmoid(answers, beta, lowest)[:, 0])  # e.g. rows whose top was swapped back

    def fails(gamma: float) -> bool:
        return bool(np.mean(np.isnan(invert_reverse_sigmoid(answers, beta, gamma)[:, 0]) & ~never) > tolerance)

    bracket = _bisect(fails, lowest, 2.0 * gamma, steps)
    return beta, gamma if bracket is None else bracket[0]


def _matching_start(answers: np.ndarray, references: np.ndarray, size: int = 20) -> tuple[float, float]:
    """The ``(beta, gamma)`` on a ``size`` x ``size`` grid over (0, 2] whose perturbation of the
    references' outputs, averaged in log space, is closest to the answers (sorted row by row)."""
    observed = np.sort(np.log(np.maximum(answers, 1e-300)), axis=-1)

    def distance(beta: float, gamma: float) -> float:
        perturbed = np.sort(np.log(np.maximum(reverse_sigmoid(references, beta, gamma), 1e-300)), axis=-1)
        return float(np.mean((perturbed.mean(axis=0) - observed) ** 2))

    axis = np.linspace(2.0 / size, 2.0, size)
    start = min(((b, g) for b in axis for g in axis), key=lambda point: distance(*point))
    refined = minimize(lambda point: distance(*point) if min(point) > 0 else np.inf, np.array(start),
                       method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-10})
    return float(refined.x[0]), float(refined.x[1])


def _bisect(holds, low: float, high: float, steps: int) -> tuple[float, float] | None:
    """The bracket ``[a, b]`` where a predicate false at ``a`` turns true at ``b``, ``steps`` halvings
    from ``[low, high]`` (widened geometrically, up to 8 times, until the predicate fails at ``low``
    and holds at ``high``; None if it never does)."""
    for _ in range(8):
        if holds(low):
            low, high = low / 2, low
        elif not holds(high):
            low, high = high, high * 2
        else:
            break
    else:
        return None
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if holds(middle) else (middle, high)
    return low, high


@dataclass(frozen=True)
class InvertedReverseSigmoid(Observation):
    """Answers perturbed by the reverse sigmoid (Lee et al. 2019): the attacker inverts each row
    (``invert_reverse_sigmoid``) with the API's ``beta`` and ``gamma``, or, when they are ``None``,
    with values estimated from ``estimation_rows`` of the answers (``estimate_reverse_sigmoid``; a
    seeded sample, no extra query), and scores the recovered confidences like an undefended answer."""

    beta: float | None = None
    gamma: float | None = None
    estimation_rows: int = 300
    seed: int = 0

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        answers = _ask(target, views).reshape(-1, target.n_classes)
        probabilities = _reference_probabilities(references, views)
        prior = probabilities.mean(axis=0).reshape(-1, target.n_classes)
        if self.beta is None or self.gamma is None:
            rows = np.random.default_rng(self.seed).permutation(len(answers))[: self.estimation_rows]
            beta, gamma = estimate_reverse_sigmoid(
                answers[rows], probabilities.reshape(len(references), -1, target.n_classes)[:, rows])
        else:
            beta, gamma = self.beta, self.gamma
        recovered = invert_reverse_sigmoid(answers, beta, gamma)
        inverted = np.isfinite(recovered[:, 0])
        recovered[~inverted] = prior[~inverted]  # no preimage: the references' mean stands in
        recovered = recovered.reshape(*views.shape[:2], -1)
        observed = scaled_logit(recovered, y)
        return Measurement(observed, observed, scaled_logit(probabilities, y),
                           {"beta": beta, "gamma": gamma, "inverted": float(inverted.mean())},
                           {"recovered": recovered})


@dataclass(frozen=True)
class AveragedNoise(Observation):
    """Answers perturbed by random multiplicative noise ``p exp(scale z)`` (renormalised): each candidate
    is asked ``repeats`` times as ``x + j * step`` (``j = 0..repeats-1``, moved towards the middle of the
    box), inputs the model cannot tell apart but a per-query noise seed may; the answers are averaged
    in log space (the noise is additive there). ``step`` is the smallest of ``steps`` whose probes
    (``probes`` candidates asked 4 times each) draw distinct answers; if none does, the answers cannot
    be averaged and each candidate is asked once. The references' outputs get the same noise averaged
    over as many draws, so their Gaussians include what noise remains."""

    scale: float
    repeats: int = 32
    steps: tuple[float, ...] = (1e-12, 1e-9, 1e-6, 1e-4)
    probes: int = 8
    seed: int = 0

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        direction = np.where(views > 0.5, -1.0, 1.0)
        step = self._fresh_step(target, views[0, : self.probes], direction[0, : self.probes])
        repeats = self.repeats if step is not None else 1
        offsets = np.arange(repeats)[:, None, None, None] * (step or 0.0) * direction
        answers = _ask(target, (views[None] + offsets).reshape(-1, *views.shape[1:]))
        answers = answers.reshape(repeats, *views.shape[:2], -1)
        averaged = _log_average(np.log(np.maximum(answers, 1e-300)))
        observed = scaled_logit(averaged, y)
        rng = np.random.default_rng(self.seed)
        simulated = [_log_average(self._noisy(p, repeats, rng)) for p in _reference_probabilities(references, views)]
        reference = scaled_logit(np.stack(simulated), y)
        return Measurement(observed, observed, reference, {"step": step or 0.0, "repeats": float(repeats)})

    def _fresh_step(self, target: Target, probes: np.ndarray, direction: np.ndarray) -> float | None:
        for step in self.steps:
            asked = target.predict_proba(np.concatenate([probes + j * step * direction for j in range(4)]))
            asked = asked.reshape(4, len(probes), -1)
            if np.mean(np.ptp(asked, axis=0).max(axis=-1) > 0) >= 0.5:
                return step
        return None

    def _noisy(self, probabilities: np.ndarray, repeats: int, rng: np.random.Generator) -> np.ndarray:
        """``(repeats, views, n, k)`` log-probabilities of noisy copies of ``probabilities``."""
        logits = np.log(np.maximum(probabilities, 1e-300))[None] + self.scale * rng.standard_normal(
            (repeats, *probabilities.shape))
        return logits - logsumexp(logits, axis=-1, keepdims=True)


def _log_average(log_probabilities: np.ndarray) -> np.ndarray:
    """The normalised geometric mean over the first axis."""
    mean = log_probabilities.mean(axis=0)
    return np.exp(mean - logsumexp(mean, axis=-1, keepdims=True))


@dataclass(frozen=True)
class LabelRobustness(Observation):
    """Labels only (Choquette-Choo et al. 2021, sec. 4, calibrated per example as in LiRA): for each
    view, the fraction of ``n_noise`` Gaussian-noised copies (standard deviation ``sigma``) labelled
    correctly, on the logit scale (``logit((c + 1/2) / (n + 1))`` for ``c`` correct of ``n``); the
    references label the very same copies. Views are the candidates or their shifted images
    (augmentation robustness, LiRA's ``image_shape``/``max_shift``)."""

    n_noise: int = 32
    sigma: float = 0.1
    seed: int = 0

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        rng = np.random.default_rng(self.seed)
        noisy = views[None] + self.sigma * rng.standard_normal((self.n_noise, *views.shape))
        flat = noisy.reshape(-1, views.shape[-1])
        correct = target.predict(flat).reshape(noisy.shape[:-1]) == y
        reference = np.concatenate([references.logits(chunk).argmax(dim=-1).numpy()
                                    for chunk in np.array_split(flat, max(1, len(flat) // 65536))], axis=1)
        reference = reference.reshape(len(references), *noisy.shape[:-1]) == y
        observed = self._statistic(correct.sum(axis=0))
        return Measurement(observed, observed, self._statistic(reference.sum(axis=1)))

    def _statistic(self, correct: np.ndarray) -> np.ndarray:
        return logit((correct + 0.5) / (self.n_noise + 1))
