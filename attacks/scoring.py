"""Measures shared by all attacks: fidelity, membership ROC measures, reconstruction quality."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def agreement(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Fraction of inputs on which two models predict the same label (fidelity)."""
    return float(np.mean(np.asarray(labels_a) == np.asarray(labels_b)))


def uniform_inputs(n: int, n_features: int, seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Uniform random inputs in the feature box, for agreement off the data distribution."""
    return np.random.default_rng(seed).uniform(low, high, size=(n, n_features))


def extraction_measures(stolen: Callable, oracle: Callable, X_test: np.ndarray, y_test: np.ndarray | None = None,
                        n_uniform: int = 10_000, seed: int = 1) -> dict[str, float]:
    """Fidelity of a stolen model to the target (Tramèr et al. 2016, sec. 3: agreement on test inputs
    and on uniform random inputs of the [0, 1] box) and, given labels, the stolen model's test
    accuracy. ``stolen`` and ``oracle`` map a batch to labels."""
    uniform = uniform_inputs(n_uniform, np.shape(X_test)[1], seed)
    measures = {
        "agreement_test": agreement(stolen(X_test), oracle(X_test)),
        "agreement_uniform": agreement(stolen(uniform), oracle(uniform)),
    }
    if y_test is not None:
        measures["accuracy_test"] = agreement(stolen(X_test), y_test)
    return measures


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target_fpr: float) -> float:
    """TPR at exactly ``target_fpr``, linearly interpolated on the ROC curve. Between two ROC points
    the segment is what a threshold at a tied score reaches by breaking the tie at random (Fawcett
    2006, sec. 5), so an attack with few distinct scores is never below chance (TPR = FPR) by
    construction, as the highest TPR at FPR <= target would make it."""
    return float(np.interp(target_fpr, fpr, tpr))


def clopper_pearson(successes: float, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for a rate (Clopper and Pearson 1934);
    ``successes`` is rounded to a whole count."""
    from scipy.stats import beta

    k, n = int(round(successes)), int(trials)
    alpha = 1.0 - confidence
    low = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


LOW_FPRS = {"1pct": 0.01, "0.1pct": 0.001}


def membership_measures(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """AUC, TPR at 1% and 0.1% FPR (ties broken at random, ``tpr_at_fpr``), best balanced accuracy,
    membership advantage (max TPR - FPR, Yeom et al. 2018) of scores where higher means 'member', and
    the counts of members and non-members, from which confidence intervals over candidates and seeds
    are computed (``clopper_pearson``)."""
    is_member = np.asarray(is_member, dtype=bool)
    fpr, tpr, _ = roc_curve(is_member, scores)
    advantage = float(np.max(tpr - fpr))
    return {
        "auc": float(roc_auc_score(is_member, scores)),
        **{f"tpr_at_{name}_fpr": tpr_at_fpr(fpr, tpr, rate) for name, rate in LOW_FPRS.items()},
        "balanced_accuracy": 0.5 + advantage / 2,
        "advantage": advantage,
        "members": float(is_member.sum()),
        "non_members": float((~is_member).sum()),
    }


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` arrays for plotting on log-log axes."""
    fpr, tpr, _ = roc_curve(np.asarray(is_member, dtype=bool), scores)
    return fpr, tpr


def reconstruction_error(reconstructions: np.ndarray, references: np.ndarray) -> float:
    """Mean squared error per feature between reconstructions and reference inputs."""
    return float(np.mean((np.asarray(reconstructions) - np.asarray(references)) ** 2))


def identification_accuracy(evaluator: Callable, reconstructions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of reconstructions an independent classifier (``evaluator``: batch -> labels)
    assigns to the class they were meant to recover."""
    return float(np.mean(evaluator(np.asarray(reconstructions)) == np.asarray(labels)))


def attribute_inference_measures(guesses: np.ndarray, truth: np.ndarray, positive: float) -> dict[str, float]:
    """Accuracy of inferred attribute values, and precision and recall on the ``positive`` value
    (Fredrikson et al. 2014, sec. 4.2); precision is 0 when ``positive`` is never guessed."""
    guesses, truth = np.asarray(guesses), np.asarray(truth)
    hits = np.sum((guesses == positive) & (truth == positive))
    return {
        "accuracy": float(np.mean(guesses == truth)),
        "precision": float(hits / max(np.sum(guesses == positive), 1)),
        "recall": float(hits / max(np.sum(truth == positive), 1)),
    }
