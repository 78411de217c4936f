"""Ownership verification against watermark records, after DAWN (Szyller, Atli, Marchal, Asokan,
"DAWN: Dynamic Adversarial Watermarking of Neural Networks", ACM MM 2021; arXiv:1906.00830): query
the suspect on the inputs whose answers were watermarked and count how many of the wrong labels it
reproduces; a model trained on those answers reproduces many, an independent model few. DAWN claims
ownership when a surrogate reproduces more of them than an independent model plausibly could (its
abstract: confidence above 1 - 2^-64, from watermarks on under 0.5% of the queries); its reference
code measures the fraction reproduced on a watermark set (250 in its MNIST and CIFAR-10
configurations) and holds no statistical test. The test below is this module's own.

The records (one JSON object a line, as ``guard watermarks export`` writes them) hold *watermark*
queries, answered with a keyed wrong label, and *control* queries from the same clients, answered
truthfully and recorded with the keyed wrong label they would have got. The key chose both kinds
and their labels by one hash, independently of the queries, so for a model that never saw the
watermarked answers the two kinds are exchangeable: it agrees with a watermark label as often as
with a control label. The test compares the two rates: one-sided Fisher's exact test, i.e. the
binomial count of reproduced watermarks against the suspect's own rate of agreeing with wrong
labels on the controls, conditioned on the total so the uncertainty of that measured rate counts.
It does not assume the suspect errs like a uniform guess (1/k): a model that is often wrong on the
attacker's queries, or wrong towards the same classes, raises its control rate as much.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import hypergeom

from attacks.ensemble import Architecture, TrainingConfig, train_ensemble

ALPHA = 1e-6
"""The default false-accusation level: an independent model is accused with at most this probability."""

ASSUMPTIONS = (
    "the records are the owner's, unaltered, and their labels are class indices in the suspect's class order",
    "watermarked and control queries were chosen by a keyed hash the suspect's trainer never had",
    ("an independent model agrees with a watermark label as often as with a control label (exchangeable "
     "records), so the p-value is exact under that null; it is not a claim about any other model"),
    "per-client verdicts are taken at alpha divided by the number of clients (Bonferroni)",
)


@dataclass(frozen=True)
class Records:
    """Recorded queries: ``features`` ``(n, d)``, ``labels`` (the watermark, or would-be watermark,
    class), ``watermarked`` (else a control), ``clients``."""

    features: np.ndarray
    labels: np.ndarray
    watermarked: np.ndarray
    clients: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> Records:
        """Records from a JSON-lines file (``guard watermarks export``)."""
        return cls.from_lines(Path(path).read_text().splitlines(), str(path))

    @classmethod
    def from_lines(cls, lines: Iterable[str | bytes], source: str = "the records") -> Records:
        """Records from JSON lines, one record an object."""
        rows = [json.loads(line) for line in lines if line.strip()]
        if not rows:
            raise ValueError(f"{source} holds no watermark records")
        return cls(np.array([row["features"] for row in rows], dtype=np.float64),
                   np.array([row["label"] for row in rows], dtype=np.int64),
                   np.array([row["kind"] == "watermark" for row in rows]),
                   np.array([row["client"] for row in rows]))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> Records:
        return Records(self.features[rows], self.labels[rows], self.watermarked[rows], self.clients[rows])


@dataclass(frozen=True)
class Evidence:
    """One test: of ``watermarks`` watermark records the suspect reproduced ``reproduced``; of
    ``controls`` control records it agreed with ``agreed``; the one-sided ``p_value``; ``accused``
    at the level ``alpha``."""

    scope: str
    watermarks: int
    reproduced: int
    controls: int
    agreed: int
    p_value: float
    alpha: float

    @property
    def accused(self) -> bool:
        return self.p_value <= self.alpha


@dataclass(frozen=True)
class Verification:
    """The pooled test over every client's records (``overall``), one per client (``clients``), and
    the verification queries spent."""

    overall: Evidence
    clients: list[Evidence]
    queries: int
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)


def p_value(watermarks: int, reproduced: int, controls: int, agreed: int) -> float:
    """One-sided Fisher's exact test that the suspect agrees with watermark labels more often than
    with control labels: ``P[X >= reproduced]`` for ``X`` hypergeometric (``watermarks`` draws from
    ``watermarks + controls`` records of which ``reproduced + agreed`` agree)."""
    if watermarks == 0:
        return 1.0
    return float(hypergeom.sf(reproduced - 1, watermarks + controls, reproduced + agreed, watermarks))


def watermarks_needed(null_rate: float, alpha: float = ALPHA, controls_per_mark: int = 9,
                      most: int = 100_000) -> int:
    """The fewest watermarks with which ``p_value`` can reach ``alpha``: every watermark reproduced,
    beside ``controls_per_mark`` controls each agreed with at the suspect's ``null_rate`` (its rate of
    agreeing with wrong labels, measured on controls). Fewer, and no suspect can be accused at
    ``alpha``, whatever it reproduces: a statistical limit of the test, not of the copy. ``most`` if
    even that many do not suffice."""
    for marks in range(1, most):
        controls = controls_per_mark * marks
        if p_value(marks, marks, controls, round(null_rate * controls)) <= alpha:
            return marks
    return most


def queries_needed(rate: float, null_rate: float, alpha: float = ALPHA, controls_per_mark: int = 9) -> int:
    """The queries a copier makes, on average, before the answers it trains on hold
    ``watermarks_needed`` watermarks at the watermark's ``rate``: fewer, and no claim at ``alpha`` is
    possible against its copy."""
    return math.ceil(watermarks_needed(null_rate, alpha, controls_per_mark) / rate)


def evidence(scope: str, matches: np.ndarray, watermarked: np.ndarray, alpha: float) -> Evidence:
    """The test on ``matches`` (the suspect's answer equals the record's label), by record kind."""
    w, c = int(watermarked.sum()), int((~watermarked).sum())
    reproduced, agreed = int(matches[watermarked].sum()), int(matches[~watermarked].sum())
    return Evidence(scope, w, reproduced, c, agreed, p_value(w, reproduced, c, agreed), alpha)


class OwnershipTest:
    """Ownership verification after DAWN at false-accusation level ``alpha``, on at most
    ``max_queries`` records (a random subset, the same for every suspect with the same ``seed``)."""

    def __init__(self, alpha: float = ALPHA, max_queries: int = 2000, seed: int = 0) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.max_queries, self.seed = alpha, max_queries, seed

    def chosen(self, records: Records) -> Records:
        """The records a verification queries."""
        if len(records) <= self.max_queries:
            return records
        rows = np.random.default_rng(self.seed).choice(len(records), self.max_queries, replace=False)
        return records.subset(np.sort(rows))

    def run(self, predict: Callable[[np.ndarray], np.ndarray], records: Records) -> Verification:
        """Query ``predict`` (features to class indices: a ``Target``'s ``predict``, a local model)
        on the records and test the suspect overall and per client."""
        records = self.chosen(records)
        return self.judge(np.asarray(predict(records.features)) == records.labels, records)

    def judge(self, matches: np.ndarray, records: Records) -> Verification:
        """The verification from a suspect's ``matches`` with the labels of ``records`` (``chosen``)."""
        names = sorted(set(records.clients.tolist()))
        per_client = [evidence(name, matches[records.clients == name], records.watermarked[records.clients == name],
                               self.alpha / len(names)) for name in names]
        return Verification(evidence("all clients", matches, records.watermarked, self.alpha), per_client,
                            len(records))


def consistent_answers(X: np.ndarray, labels: np.ndarray, n_classes: int, architecture: Architecture,
                       training: TrainingConfig = TrainingConfig(), folds: int = 5, seed: int = 0) -> np.ndarray:
    """The adaptive attacker's filter against a watermark it knows of (Kerckhoffs): which answers an
    ensemble trained on the *other* answers agrees with (out of fold, so no member saw the answer it
    judges; one batched ensemble of ``folds`` models). A wrong label among right neighbours is voted
    down; the attacker trains its copy on the rest."""
    fold = np.random.default_rng(seed).permutation(len(X)) % folds
    masks = fold[None, :] != np.arange(folds)[:, None]
    ensemble = train_ensemble(X, labels, masks, n_classes, architecture=architecture, config=training, seed=seed)
    votes = ensemble.logits(X).argmax(dim=-1).numpy()
    return votes[fold, np.arange(len(X))] == labels
