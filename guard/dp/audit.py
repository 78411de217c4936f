"""Empirical lower bounds on the epsilon of a DP-SGD run: evidence that the accountant's epsilon holds.

A lower bound is what an attack proves the run leaks: far below the accountant's epsilon is expected
(one attack, one run); above it means the training does not deliver the epsilon it reports (a bug).

- :func:`membership_epsilon`: black-box, from a membership attack's TPR/FPR with Clopper-Pearson
  intervals, the estimate of Jagielski, Ullman & Oprea (NeurIPS 2020, "Auditing Differentially
  Private Machine Learning: How Private is Private SGD?") and Nasr et al. (IEEE S&P 2021,
  "Adversary Instantiation: Lower Bounds for Differentially Private Machine Learning").
- :func:`one_run_epsilon` and :func:`audit`: the one-run canary audit of Steinke, Nasr & Jagielski
  (NeurIPS 2023, "Privacy Auditing with One (1) Training Run"): m canaries, each included in the
  single training run with probability 1/2, guesses on the highest and lowest scores only, and the
  bound of their Theorem 5.2 on the number of correct guesses of an (epsilon, delta)-DP mechanism.
  White-box gradient canaries (their Algorithm 3) where the auditor has the weights; input-space
  canaries (mislabelled examples scored by loss, as in their black-box experiments) otherwise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from scipy import stats

from guard.dp.checks import DPConfigError, as_tensors
from guard.dp.report import PrivacyReport
from guard.dp.training import train_private

CONFIDENCE = 0.95
CanaryKind = Literal["gradient", "input"]
CANARY_KINDS: tuple[str, ...] = ("gradient", "input")
#: The guess counts tried, as fractions of the canaries; each with guesses on the top scores only
#: and split evenly between top and bottom. The confidence is split over them (Bonferroni).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)
#: A gradient canary's norm before clipping, in units of the clipping norm: clipping must shrink it.
CANARY_NORM = 100.0
#: The share of the audit's error rate left to the delta term ``2 m delta`` of Steinke et al.'s bound:
#: the canary audit is run at ``delta <= DELTA_SHARE (1 - confidence) / (2 m)`` (else that term
#: alone exceeds the error rate for ``delta ~ 1/(10 n)`` and any ``m`` canaries worth having), and
#: compared with the accountant's epsilon at that delta.
DELTA_SHARE = 0.01


@dataclass(frozen=True)
class EpsilonAudit:
    """An audited lower bound on epsilon at ``delta``, holding with probability ``confidence``,
    beside the accountant's ``epsilon`` at the same ``delta`` for the audited run."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    epsilon: float
    method: str
    canaries: int = 0
    guesses: int = 0
    correct: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def accountant_epsilon(report: PrivacyReport, delta: float) -> float:
    """The accountant's epsilon for the run of ``report`` at another ``delta``."""
    accountant = create_accountant(report.accountant)
    accountant.history = [tuple(segment) for segment in report.history]
    with warnings.catch_warnings():
        # a looser (larger) RDP epsilon only makes the audit slower to call a run broken
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


def clopper_pearson(successes: np.ndarray, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds ``(lower, upper)`` on a binomial rate, each holding with
    probability ``1 - alpha``."""
    successes = np.asarray(successes, dtype=float)
    lower = np.where(successes > 0, stats.beta.ppf(alpha, successes, trials - successes + 1), 0.0)
    upper = np.where(successes < trials, stats.beta.ppf(1 - alpha, successes + 1, trials - successes), 1.0)
    return lower, upper


def membership_epsilon(scores: np.ndarray, is_member: np.ndarray, delta: float,
                       confidence: float = CONFIDENCE) -> float:
    """The largest epsilon a membership attack's ROC proves, over every threshold ("member" when the
    score is at least it), holding with probability ``confidence`` for all thresholds at once.

    An (epsilon, delta)-DP training run bounds every test: ``TPR <= e^eps FPR + delta`` and
    ``TNR <= e^eps FNR + delta`` (Kairouz et al. 2015, Thm 2.1), so
    ``eps >= log((TPR_lo - delta) / FPR_hi)`` and ``eps >= log((TNR_lo - delta) / FNR_hi)``,
    with Clopper-Pearson bounds as in Jagielski et al. (2020). The confidence is split over the
    two bounds of every threshold (Bonferroni), so choosing the best threshold costs no validity."""
    scores, is_member = np.asarray(scores, dtype=float), np.asarray(is_member, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    ranked, members = scores[order], is_member[order]
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # last index of each score
    positives, negatives = int(members.sum()), int((~members).sum())
    true_positives = np.cumsum(members)[ends]
    false_positives = np.cumsum(~members)[ends]
    alpha = (1 - confidence) / (2 * len(ends))
    tpr_low, _ = clopper_pearson(true_positives, positives, alpha)
    _, fpr_high = clopper_pearson(false_positives, negatives, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.concatenate([(tpr_low - delta) / fpr_high, (1 - fpr_high - delta) / (1 - tpr_low)])
    proved = ratios[np.isfinite(ratios) & (ratios > 1)]
    return float(np.log(proved.max())) if len(proved) else 0.0


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """An upper bound on the chance that ``guesses`` guesses about ``canaries`` canaries include
    ``correct`` or more right ones, for an (epsilon, delta)-DP run (Steinke et al. 2023, Thm 5.2):
    ``f(v) + 2 m delta max_i (f(v - i) - f(v)) / i`` with ``f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v]``."""
    rate = 1 / (1 + math.exp(-epsilon))
    tail = stats.binom.sf(correct - 1, guesses, rate)
    shifts = np.arange(1, correct + 1)
    gaps = stats.binom.cdf(correct - 1, guesses, rate) - stats.binom.cdf(correct - 1 - shifts, guesses, rate)
    slack = float(np.max(gaps / shifts)) if correct > 0 else 0.0
    return min(1.0, float(tail + 2 * canaries * delta * slack))


def one_run_epsilon(canaries: int, guesses: int, correct: int, delta: float,
                    confidence: float = CONFIDENCE) -> float:
    """The largest epsilon an (epsilon, delta)-DP run is refuted at with ``confidence``: ``correct``
    right guesses of ``guesses`` would happen with probability below ``1 - confidence``
    (Steinke et al. 2023, §5; found by bisection, the p-value grows with epsilon)."""
    if guesses == 0 or one_run_p_value(canaries, guesses, correct, 0.0, delta) >= 1 - confidence:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(canaries, guesses, correct, high, delta) < 1 - confidence:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if one_run_p_value(canaries, guesses, correct, middle,
                                                      delta) < 1 - confidence else (low, middle)
    return low


def one_run_audit(scores: np.ndarray, included: np.ndarray, delta: float,
                  confidence: float = CONFIDENCE) -> tuple[float, int, int]:
    """``(epsilon_lower_bound, guesses, correct)`` from canary ``scores`` (higher: "included") and
    the true inclusion bits (Steinke et al. 2023, Algorithm 1: guess "in" for the ``k+`` highest,
    "out" for the ``k-`` lowest, abstain on the rest). The ``GUESS_FRACTIONS`` settings are all
    tried, the confidence split over them (Bonferroni)."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    settings = {(max(1, round(f * m)), 0) for f in GUESS_FRACTIONS}
    settings |= {(max(1, round(f * m / 2)), max(1, round(f * m / 2))) for f in GUESS_FRACTIONS}
    per_setting = 1 - (1 - confidence) / len(settings)
    best = (0.0, 0, 0)
    for top, bottom in sorted(settings):
        correct = int(included[order[:top]].sum() + (~included[order[m - bottom:]]).sum())
        bound = one_run_epsilon(m, top + bottom, correct, delta, per_setting)
        best = max(best, (bound, top + bottom, correct))
    return best


class GradientCanaries:
    """White-box gradient canaries (Steinke et al. 2023, Algorithm 3): canary ``i`` is a per-example
    gradient ``CANARY_NORM * C * s_i e_{j_i}`` on its own coordinate ``j_i`` (dealt evenly over
    the parameter tensors, so a layer with broken clipping holds canaries too) with a random sign
    ``s_i``. An included canary joins each logical batch with the data's sampling rate, before
    clipping; its score is ``s_i`` times the sum over steps of the privatised gradient at
    ``j_i``, which the auditor reads off the weights at every step. The data's per-example
    gradients are zeroed on the canaries' coordinates, so the model's own learning does not drown
    them: DP-SGD is private for any per-example gradient, and sampling, clipping, noise and
    accounting stay exactly as they are."""

    def __init__(self, count: int, included: np.ndarray, rng: np.random.Generator) -> None:
        self.count, self.rng = count, rng
        self.included = np.asarray(included, dtype=bool)
        self.sign = rng.choice([-1.0, 1.0], count)
        self.scores = np.zeros(count)

    def _lay_out(self, sizes: np.ndarray) -> None:
        """Each canary's tensor and coordinate: distinct coordinates, dealt evenly over the tensors."""
        if self.count > sizes.sum():
            raise DPConfigError(f"{self.count} gradient canaries need as many coordinates; the model "
                                f"has {sizes.sum()}")
        per_tensor = np.zeros(len(sizes), dtype=np.int64)
        for _ in range(self.count):  # round-robin over the tensors that still have a free coordinate
            free = np.flatnonzero(per_tensor < sizes)
            per_tensor[free[np.argmin(per_tensor[free])]] += 1
        self.tensor = np.repeat(np.arange(len(sizes)), per_tensor)
        self.coordinate = np.concatenate([self.rng.choice(size, k, replace=False)
                                          for size, k in zip(sizes, per_tensor)])

    def attach(self, optimiser: DPOptimizer, sample_rate: float) -> None:
        """Insert the sampled canaries into ``optimiser``'s per-example gradients before clipping,
        and score them from each step's privatised gradient."""
        self._lay_out(np.array([p.numel() for p in optimiser.params]))
        clip = optimiser.clip_and_accumulate
        record = optimiser.step_hook

        def clip_with_canaries() -> None:
            self._mask_data(optimiser)
            if not optimiser._check_skip_next_step(pop_next=False):  # the step's last physical batch
                joined = np.flatnonzero(self.included & (self.rng.random(len(self.included)) < sample_rate))
                self._insert(optimiser, joined)
            clip()

        def step_hook(dp_optimiser: DPOptimizer) -> None:
            for index, p in enumerate(dp_optimiser.params):
                mine = self.tensor == index
                grad = p.grad.detach().reshape(-1)[torch.as_tensor(self.coordinate[mine])]
                self.scores[mine] += self.sign[mine] * grad.double().numpy()
            if record is not None:
                record(dp_optimiser)

        optimiser.clip_and_accumulate = clip_with_canaries
        optimiser.attach_step_hook(step_hook)

    def _mask_data(self, optimiser: DPOptimizer) -> None:
        for index, p in enumerate(optimiser.params):
            coordinates = torch.as_tensor(self.coordinate[self.tensor == index])
            for rows in p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]:
                rows.view(len(rows), -1)[:, coordinates] = 0.0

    def _insert(self, optimiser: DPOptimizer, joined: np.ndarray) -> None:
        norm = CANARY_NORM * optimiser.max_grad_norm
        for index, p in enumerate(optimiser.params):
            rows = torch.zeros(len(joined), p.numel(), dtype=p.dtype)
            mine = np.flatnonzero(self.tensor[joined] == index)
            rows[torch.as_tensor(mine), torch.as_tensor(self.coordinate[joined[mine]])] = torch.as_tensor(
                norm * self.sign[joined[mine]], dtype=p.dtype)
            rows = rows.reshape(len(joined), *p.shape)
            if isinstance(p.grad_sample, list):
                p.grad_sample.append(rows)
            else:
                p.grad_sample = torch.cat([p.grad_sample, rows])


def audit(model: torch.nn.Module, train_data: tuple, *, kind: CanaryKind = "gradient",
          canaries: int | None = None, confidence: float = CONFIDENCE, **train_options) -> EpsilonAudit:
    """One-run audit of DP-SGD as :func:`train_private` runs it with ``train_options``: one extra
    training run of ``model`` on ``train_data`` with canaries (the released model never sees
    them), then the lower bound of :func:`one_run_audit`.

    ``kind="gradient"``: white-box gradient canaries (:class:`GradientCanaries`), default
    ``min(1000, parameters)`` of them; per-example gradients are materialised (``hooks`` mode).
    ``kind="input"``: a random set of the training rows, default ``min(500, n // 4)``, given a wrong
    label and each kept with probability 1/2; scored by the trained model's log-probability of the
    wrong label, as a black-box auditor who sees only predictions would."""
    if kind not in CANARY_KINDS:
        raise DPConfigError(f"unknown canary kind {kind!r}: use one of {CANARY_KINDS}")
    rng = np.random.default_rng(train_options.get("seed"))
    options = {**train_options, "grad_sample_mode": "hooks", "test_data": None, "checkpoint_dir": None,
               "resume": False, "progress": False, "on_epoch": None}
    X, y = as_tensors(train_data)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    count = canaries or (min(1000, n_parameters) if kind == "gradient" else min(500, len(X) // 4))
    included = rng.random(count) < 0.5
    if kind == "gradient":
        planted = GradientCanaries(count, included, rng)
        _, report = train_private(model, (X, y), instrument=planted.attach, **options)
        scores, method = planted.scores, "one-run audit, white-box gradient canaries"
    else:
        rows = rng.choice(len(X), count, replace=False)
        with torch.no_grad():
            n_classes = int(model(X[:1]).shape[-1])
        wrong = (y[rows] + torch.as_tensor(rng.integers(1, n_classes, count))) % n_classes
        kept = np.setdiff1d(np.arange(len(X)), rows)
        X_run = torch.cat([X[kept], X[rows[included]]])
        y_run = torch.cat([y[kept], wrong[torch.as_tensor(included)]])
        trained, report = train_private(model, (X_run, y_run), **options)
        with torch.no_grad():
            log_probabilities = torch.log_softmax(trained(X[rows]), dim=1)
        scores = log_probabilities[torch.arange(count), wrong].double().numpy()
        method = "one-run audit, input-space canaries (mislabelled rows)"
    delta = min(report.delta, DELTA_SHARE * (1 - confidence) / (2 * count))
    bound, guesses, correct = one_run_audit(scores, included, delta, confidence)
    return EpsilonAudit(bound, confidence, delta, accountant_epsilon(report, delta),
                        f"{method} (Steinke, Nasr & Jagielski 2023)", count, guesses, correct)
