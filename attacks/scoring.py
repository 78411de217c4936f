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
    accuracy; ``test_points`` counts the test inputs (the trials of agreement's binomial interval).
    ``stolen`` and ``oracle`` map a batch to labels."""
    uniform = uniform_inputs(n_uniform, np.shape(X_test)[1], seed)
    measures = {
        "agreement_test": agreement(stolen(X_test), oracle(X_test)),
        "agreement_uniform": agreement(stolen(uniform), oracle(uniform)),
        "test_points": float(len(X_test)),
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


def standardise(X: np.ndarray) -> np.ndarray:
    """Each row shifted to mean 0 and scaled to standard deviation 1: what a judge of pictures sees
    regardless of their brightness and contrast."""
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(axis=1, keepdims=True)
    return centred / (centred.std(axis=1, keepdims=True) + 1e-8)


def ssim(a: np.ndarray, b: np.ndarray, image_shape: tuple[int, ...], sigma: float = 1.5) -> np.ndarray:
    """Structural similarity of paired images in [0, 1] (Wang, Bovik, Sheikh, Simoncelli 2004,
    Gaussian window of width ``sigma``, K1 = 0.01, K2 = 0.03, data range 1): one value per pair."""
    from scipy import ndimage

    shape = (-1, *image_shape[:2])
    a = np.asarray(a, dtype=np.float64).reshape(shape)
    b = np.asarray(b, dtype=np.float64).reshape(shape)
    blur = lambda image: ndimage.gaussian_filter(image, sigma=(0, sigma, sigma), mode="reflect")
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    covariance = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.reshape(len(a), -1).mean(axis=1)


class Judge:
    """Judges reconstructions of people (or classes) the way Fredrikson et al. (CCS 2015, sec. 5.3)
    had people judge them, from held-out photos of the victims that no attack saw:

    - ``identification_accuracy``: a logistic-regression classifier trained on the standardised
      photos (insensitive to brightness and contrast) names the reconstruction's person;
    - ``lineup_accuracy``: the paper's human study, pick the person among ``lineup`` (5): the
      reconstruction is shown beside its person and ``lineup - 1`` others, each by the mean of their
      standardised photos, and the judge picks the person most correlated with it (``lineups``
      random line-ups per reconstruction, in random order, so ties are not hits);
    - ``ssim`` and ``mse``: mean structural similarity and squared error to the person's photos.
    """

    def __init__(self, photos: np.ndarray, labels: np.ndarray, image_shape: tuple[int, ...] | None = None,
                 lineup: int = 5, lineups: int = 20, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        self.photos = np.asarray(photos, dtype=np.float64)
        self.labels = np.asarray(labels)
        self.classes = np.unique(self.labels)
        self.image_shape = image_shape
        self.lineup = min(lineup, len(self.classes))
        self.lineups = lineups
        self.seed = seed
        self.classifier = LogisticRegression(C=1.0, max_iter=2000).fit(standardise(self.photos), self.labels)

    def identify(self, X: np.ndarray) -> np.ndarray:
        return self.classifier.predict(standardise(X))

    def measures(self, reconstructions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        reconstructions, labels = np.asarray(reconstructions, dtype=np.float64), np.asarray(labels)
        measures = {"identification_accuracy": float(np.mean(self.identify(reconstructions) == labels)),
                    "lineup_accuracy": float(self.lineup_hits(reconstructions, labels).mean())}
        own = [np.flatnonzero(self.labels == label) for label in labels]
        pairs = np.concatenate(own)
        repeated = np.repeat(reconstructions, [len(rows) for rows in own], axis=0)
        measures["mse"] = reconstruction_error(repeated, self.photos[pairs])
        if self.image_shape is not None:
            measures["ssim"] = float(ssim(repeated, self.photos[pairs], self.image_shape).mean())
        return measures

    def lineup_hits(self, reconstructions: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per reconstruction, the fraction of its line-ups the judge wins; the line-ups depend on the
        judge's seed only, so two sets of reconstructions of the same labels meet the same line-ups."""
        rng = np.random.default_rng(self.seed)
        photos = standardise(self.photos)
        faces = {label: photos[self.labels == label].mean(axis=0) for label in self.classes}
        hits = []
        for reconstruction, label in zip(standardise(reconstructions), labels):
            others = self.classes[self.classes != label]
            for _ in range(self.lineups):
                people = rng.permutation(np.r_[label, rng.choice(others, self.lineup - 1, replace=False)])
                shown = np.stack([faces[person] for person in people])
                hits.append(people[np.argmax(shown @ reconstruction)] == label)
        return np.asarray(hits, dtype=float).reshape(len(labels), self.lineups).mean(axis=1)
