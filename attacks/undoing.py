"""The adaptive attacker's view of a defended API (Kerckhoffs: it knows the defence's kind and public
parameters, never its secret): an ``UndoneTarget`` hands every attack the answers with the defence
undone, so any attack that reads confidences (inversion, extraction) runs against it unchanged.

- ``inverting_reverse_sigmoid``: the reverse sigmoid of Lee et al. (2019) is a known row-wise function;
  each answer is inverted exactly (``attacks.reverse_sigmoid``), with the API's beta and gamma or with
  values estimated from the first answers.
- ``averaging``: a randomised answer is averaged, in log space, over inputs the model cannot tell apart
  (the record moved by a few ulps) at the smallest perturbation scale that draws fresh noise.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp

from attacks.reverse_sigmoid import estimate_reverse_sigmoid, invert_reverse_sigmoid
from attacks.targets import Target

STEPS: tuple[float, ...] = (1e-12, 1e-9, 1e-6, 1e-4)
"""The perturbation scales ``averaging`` tries, smallest first."""


class UndoneTarget(Target):
    """``target`` seen through ``answer``, which maps queries to the undone ``(n, k)`` probabilities
    (asking ``target`` as often as it needs); the queries counted are all of ``target``'s, and
    ``learnt`` holds what the undoing found out about the defence."""

    def __init__(self, target: Target, answer: Callable[[np.ndarray], np.ndarray]):
        self.target = target
        self.n_classes = target.n_classes
        self.budget = None
        self.answer_undone = answer
        self.learnt: dict[str, float] = {}

    @property
    def queries(self) -> int:
        return self.target.queries

    @property
    def returns_probabilities(self) -> bool:
        return True

    def _ask(self, X: np.ndarray) -> np.ndarray:
        return self.answer_undone(np.atleast_2d(np.asarray(X, dtype=np.float64)))

    def _query(self, X: np.ndarray) -> np.ndarray:
        return self._ask(X)


def inverting_reverse_sigmoid(target: Target, beta: float | None = None, gamma: float | None = None,
                              estimation_rows: int = 300, scales: tuple[float, ...] = (4.0, 16.0),
                              retries: int = 5, seed: int = 0) -> UndoneTarget:
    """Answers of a reverse-sigmoid API inverted row by row (``invert_reverse_sigmoid``) with ``beta``
    and ``gamma``, or, when they are None, with values estimated (``estimate_reverse_sigmoid``) from a
    seeded sample of up to ``estimation_rows`` rows of the first batch of answers, and the answers to
    those rows scaled by each of ``scales`` (inputs the model is near certain of, which show beta
    plainly: ``len(scales)`` times as many extra queries). A row with no preimage (gamma a little
    off, or a top the API swapped back) is inverted at gamma lowered by 1%, up to ``retries`` times,
    else kept as published; ``learnt["inverted"]`` is the fraction inverted at the estimate itself."""
    rows = {"all": 0, "inverted": 0}

    def answer(X: np.ndarray) -> np.ndarray:
        q = target.predict_proba(X)
        if "beta" not in undone.learnt:
            sample = np.random.default_rng(seed).permutation(len(q))[:estimation_rows]
            if beta is not None and gamma is not None:
                found = beta, gamma
            else:
                confident = tuple(target.predict_proba(scale * X[sample]) for scale in scales)
                found = estimate_reverse_sigmoid(q[sample], confident=confident)
            undone.learnt.update(beta=found[0], gamma=found[1])
        beta_found, gamma_found = undone.learnt["beta"], undone.learnt["gamma"]
        p = invert_reverse_sigmoid(q, beta_found, gamma_found)
        rows["all"] += len(q)
        rows["inverted"] += int(np.isfinite(p[:, 0]).sum())
        for retry in range(1, retries + 1):
            failed = np.flatnonzero(np.isnan(p[:, 0]))
            if len(failed) == 0:
                break
            p[failed] = invert_reverse_sigmoid(q[failed], beta_found, gamma_found * 0.99 ** retry)
        failed = np.isnan(p[:, 0])
        p[failed] = q[failed]
        undone.learnt["inverted"] = rows["inverted"] / rows["all"]
        return p

    undone = UndoneTarget(target, answer)
    return undone


def averaging(target: Target, repeats: int = 32, steps: tuple[float, ...] = STEPS, probes: int = 8) -> UndoneTarget:
    """Answers averaged over ``repeats`` queries ``x + j * step`` (``averaged_answers``), at the step
    ``fresh_step`` finds on the first batch's first ``probes`` rows (once asked, if no step draws
    fresh answers); ``learnt`` records the step and repeats."""

    def answer(X: np.ndarray) -> np.ndarray:
        direction = towards_middle(X)
        if "step" not in undone.learnt:
            step = fresh_step(target, X[:probes], direction[:probes], steps)
            undone.learnt.update(step=step or 0.0, repeats=float(repeats if step is not None else 1))
        return averaged_answers(target, X, direction, int(undone.learnt["repeats"]), undone.learnt["step"])

    undone = UndoneTarget(target, answer)
    return undone


def towards_middle(X: np.ndarray) -> np.ndarray:
    """The direction (+1 or -1 per feature) that moves ``X`` towards the middle of the unit box."""
    return np.where(X > 0.5, -1.0, 1.0)


def fresh_step(target: Target, probes: np.ndarray, direction: np.ndarray,
               steps: tuple[float, ...] = STEPS) -> float | None:
    """The smallest of ``steps`` at which ``probes`` moved ``j * step`` (``j = 0..3``) draw distinct
    answers for at least half of them, or None if none does (the noise cannot be redrawn)."""
    for step in steps:
        asked = target.predict_proba(np.concatenate([probes + j * step * direction for j in range(4)]))
        asked = asked.reshape(4, len(probes), -1)
        if np.mean(np.ptp(asked, axis=0).max(axis=-1) > 0) >= 0.5:
            return step
    return None


def averaged_answers(target: Target, X: np.ndarray, direction: np.ndarray, repeats: int, step: float) -> np.ndarray:
    """The normalised geometric mean of the answers to ``X + j * step * direction``, ``j < repeats``,
    asked as one batch."""
    offsets = np.arange(repeats)[:, None, None] * step * direction
    answers = target.predict_proba((X[None] + offsets).reshape(-1, X.shape[-1])).reshape(repeats, len(X), -1)
    return log_average(np.log(np.maximum(answers, 1e-300)))


def log_average(log_probabilities: np.ndarray) -> np.ndarray:
    """The normalised geometric mean over the first axis."""
    mean = log_probabilities.mean(axis=0)
    return np.exp(mean - logsumexp(mean, axis=-1, keepdims=True))
