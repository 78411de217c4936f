"""What a calibrated membership attack reads off the target, and off its reference models, for each
kind of output defence: the adaptive halves of LiRA (Carlini et al., S&P 2022, sec. IV, Alg. 1).

LiRA fits, per candidate, Gaussians to a statistic of the reference models' outputs and scores the
target's value of that statistic under them. A ``Statistic`` says how that statistic is obtained
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
- ``BoundaryDistance`` and ``HopSkipJumpDistance``: against labels only, the distance to the decision
  boundary (along random directions; or found by HopSkipJump, Li & Zhang's decision-boundary attack),
  each reference model running the same search.

Each returns a ``Measurement``: the observed statistic as an interval ``[low, high]`` per view and
candidate (``low == high`` for a point), the references' statistic, and what it learnt.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from scipy.special import logit, logsumexp

from attacks.ensemble import Ensemble
from attacks.hopskipjump import HopSkipJump
from attacks.reverse_sigmoid import estimate_reverse_sigmoid, invert_reverse_sigmoid
from attacks.targets import OutputFormat, OutputUnavailable, Target
from attacks.undoing import STEPS, averaged_answers, fresh_step, log_average, towards_middle


@dataclass
class Measurement:
    """``low``/``high``: ``(views, n)`` bounds of the target's statistic; ``reference``: ``(models,
    views, n)`` the references' statistic; ``learnt``: what the statistic found out about the
    defence (numbers, reported as metrics); ``artefacts``: anything else it made."""

    low: np.ndarray
    high: np.ndarray
    reference: np.ndarray
    learnt: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Any] = field(default_factory=dict)


class Statistic(ABC):
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
        raise OutputUnavailable("this statistic needs scores; against labels only use LabelRobustness")
    return target.predict_proba(views.reshape(-1, views.shape[-1])).reshape(*views.shape[:2], -1)


def _reference_probabilities(references: Ensemble, views: np.ndarray) -> np.ndarray:
    """``(models, views, n, k)`` probabilities of every reference model."""
    flat = references.predict_proba(views.reshape(-1, views.shape[-1]))
    return flat.reshape(len(references), *views.shape[:2], -1)


@dataclass(frozen=True)
class Published(Statistic):
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
class RoundedInterval(Statistic):
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


@dataclass(frozen=True)
class InvertedReverseSigmoid(Statistic):
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
class AveragedNoise(Statistic):
    """Answers perturbed by random multiplicative noise ``p exp(scale z)`` (renormalised): each candidate
    is asked ``repeats`` times as ``x + j * step`` (``j = 0..repeats-1``, moved towards the middle of the
    box), inputs the model cannot tell apart but a per-query noise seed may; the answers are averaged
    in log space (the noise is additive there). ``step`` is the smallest of ``steps`` whose probes
    (``probes`` candidates asked 4 times each) draw distinct answers; if none does, the answers cannot
    be averaged and each candidate is asked once. The references' outputs get the same noise averaged
    over as many draws, so their Gaussians include what noise remains."""

    scale: float
    repeats: int = 32
    steps: tuple[float, ...] = STEPS
    probes: int = 8
    seed: int = 0

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        flat = views.reshape(-1, views.shape[-1])
        direction = towards_middle(flat)
        step = fresh_step(target, flat[: self.probes], direction[: self.probes], self.steps)
        repeats = self.repeats if step is not None else 1
        averaged = averaged_answers(target, flat, direction, repeats, step or 0.0).reshape(*views.shape[:2], -1)
        observed = scaled_logit(averaged, y)
        rng = np.random.default_rng(self.seed)
        simulated = [log_average(self._noisy(p, repeats, rng)) for p in _reference_probabilities(references, views)]
        reference = scaled_logit(np.stack(simulated), y)
        return Measurement(observed, observed, reference, {"step": step or 0.0, "repeats": float(repeats)})

    def _noisy(self, probabilities: np.ndarray, repeats: int, rng: np.random.Generator) -> np.ndarray:
        """``(repeats, views, n, k)`` log-probabilities of noisy copies of ``probabilities``."""
        logits = np.log(np.maximum(probabilities, 1e-300))[None] + self.scale * rng.standard_normal(
            (repeats, *probabilities.shape))
        return logits - logsumexp(logits, axis=-1, keepdims=True)


@dataclass(frozen=True)
class LabelRobustness(Statistic):
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


@dataclass(frozen=True)
class BoundaryDistance(Statistic):
    """Labels only (Choquette-Choo et al., ICML 2021, sec. 4, the boundary-distance attack, with random
    directions in place of HopSkipJump; calibrated per example as in LiRA): for each view, the mean
    over ``n_directions`` random unit directions of the smallest L2 step that changes the label
    (``boundary_distances``; 0 where the view is already misclassified); each reference model runs
    its own search along the very same directions."""

    n_directions: int = 8
    max_distance: float = 8.0
    search_steps: int = 10
    seed: int = 0

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        directions = unit_directions(np.random.default_rng(self.seed), self.n_directions, views.shape)
        search = dict(max_distance=self.max_distance, steps=self.search_steps)
        observed = boundary_distances(partial(labels, target), views, y, directions, **search).mean(axis=0)
        reference = boundary_distances(references.labels_each, views, y, directions, **search,
                                       models=len(references)).mean(axis=1)
        return Measurement(observed, observed, reference)


@dataclass(frozen=True)
class HopSkipJumpDistance(Statistic):
    """Labels only: the decision-boundary attack of Li & Zhang ("Membership Leakage in Label-Only
    Exposures", CCS 2021, sec. 3.3): the L2 distance from each view to the boundary that HopSkipJump
    (``attacks.hopskipjump``, Chen et al., S&P 2020) finds with ``search.max_queries`` label queries per
    view (0 where the view is misclassified), calibrated per example as in LiRA: each reference model
    runs the same search on the same views, with the same random starts and probes. The statistic is
    ``log(distance + floor)``: on the digits MLP (16 references, 300 queries) its Gaussians give TPR 0.051
    at 1% FPR where the raw distance's give 0.013."""

    search: HopSkipJump = HopSkipJump()
    floor: float = 1e-3

    def measure(self, target: Target, views: np.ndarray, y: np.ndarray, references: Ensemble) -> Measurement:
        observed, queries = self.search.distances(partial(labels, target), views, y)
        reference, _ = self.search.distances(references.labels_each,
                                             np.broadcast_to(views, (len(references), *views.shape)), y)
        observed, reference = np.log(observed + self.floor), np.log(reference + self.floor)
        return Measurement(observed, observed, reference, {"queries_per_candidate": float(queries.mean())})


def labels(target: Target, points: np.ndarray) -> np.ndarray:
    """The target's labels of ``(..., d)`` points, asked in one batch, as ``(...)``."""
    return target.predict(points.reshape(-1, points.shape[-1])).reshape(points.shape[:-1])


def unit_directions(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """``(count, *shape)`` random directions, unit vectors along the last axis."""
    directions = rng.standard_normal((count, *shape))
    return directions / np.linalg.norm(directions, axis=-1, keepdims=True)


def boundary_distances(labels_of, X: np.ndarray, y: np.ndarray, directions: np.ndarray, max_distance: float,
                       steps: int, models: int | None = None) -> np.ndarray:
    """The smallest step along each of ``directions`` (``(directions, *X.shape)`` unit vectors) at
    which the label of ``X`` stops being ``y``, by ``steps`` halvings of ``[0, max_distance]``; 0 where
    ``X`` itself is not labelled ``y``. ``labels_of`` maps ``(..., d)`` points to ``(...)`` labels; with
    ``models``, it takes ``(models, ..., d)`` points, model ``i`` labelling its own (one search per
    model), and the result is ``(models, directions, ...)`` instead of ``(directions, ...)``."""
    batch = () if models is None else (models,)
    low, high = np.zeros(batch + directions.shape[:-1]), np.full(batch + directions.shape[:-1], max_distance)
    for _ in range(steps):
        middle = (low + high) / 2
        flipped = labels_of(X + middle[..., None] * directions) != y
        high, low = np.where(flipped, middle, high), np.where(flipped, low, middle)
    correct = labels_of(np.broadcast_to(X, batch + X.shape) if batch else X) == y
    return np.where(np.expand_dims(correct, len(batch)), high, 0.0)
