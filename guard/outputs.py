"""Output defences: pure transforms of an ``(n, k)`` array of class probabilities (or the same as
``n`` lists of ``k`` floats, as the middleware reads them from an answer).

Every defence is called as ``defence(probabilities, features)`` (``features``: the ``n`` query
rows of ``d``, an array or lists, used only by ``Noise``), returns a new probability distribution
per row, as an ``(n, k)`` array (``Round``, given lists, returns lists) and keeps each row's top
label (the first argmax of its input). ``read_spec`` reads a spec string by the grammar below (and
checks its arguments, building nothing); ``parse`` builds the defence it names; ``Pipeline`` applies
several in order.

| spec | defence |
| --- | --- |
| ``round:D`` | ``Round(D)``: D decimals, still a distribution (Tramèr et al. 2016, Section 6.1) |
| ``top_k:K`` | ``TopK(K)``: the K largest kept, the rest zeroed, renormalised |
| ``label_only`` | ``LabelOnly()``: only the predicted label survives (must come last) |
| ``noise:S`` | ``Noise(S, secret)``: keyed log-normal perturbation, identical for a repeated query |
| ``reverse_sigmoid:BETA:GAMMA`` | ``ReverseSigmoid(BETA, GAMMA)`` (Lee et al. 2019) |
| ``watermark:R`` | ``Watermark(R, secret)``: a keyed fraction R of answers gets a keyed wrong label (DAWN) |

``Watermark`` is the one defence that changes a row's top label, and the one keyed by the client
too: ``Pipeline`` hands it the ``client`` its caller names.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit


def normalise(probabilities: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows are non-negative with a positive sum)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def ranks(values: np.ndarray) -> np.ndarray:
    """Each entry's 0-based rank in its row, smallest first; ties ranked by column (a stable sort)."""
    return values.argsort(axis=1, kind="stable").argsort(axis=1, kind="stable")


def keep_top(q: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Make ``top`` (one column per row) the first argmax of ``q`` in place: swap the largest
    value into that column, then lift it by one ulp where an earlier column ties with it."""
    winner = q.argmax(axis=1)
    if (winner == top).all():
        return q
    rows = np.arange(len(q))
    largest = q[rows, winner]
    q[rows, winner] = q[rows, top]
    q[rows, top] = largest
    tied = q.argmax(axis=1) != top
    q[tied, top[tied]] = np.nextafter(q[tied, top[tied]], np.inf)
    return q


class OutputDefence(ABC):
    """A transform of class probabilities that keeps each row's top label."""

    @abstractmethod
    def __call__(self, probabilities: np.ndarray | list[list[float]],
                 features: np.ndarray | None = None) -> np.ndarray:
        """The defended ``(n, k)`` distributions of ``probabilities`` (``(n, k)``)."""

    @staticmethod
    def check(*arguments: float) -> None:
        """Raise ``ValueError`` unless ``arguments`` are in the defence's ranges (none by default)."""


@dataclass(frozen=True)
class Round(OutputDefence):
    """Round to ``decimals`` places (Tramèr et al. 2016, "Stealing Machine Learning Models via
    Prediction APIs", Section 6.1) so that rows still sum to one: every row is apportioned in units
    of ``10**-decimals`` by the largest-remainder method, each entry is within one unit of its exact
    value (two in the rare row where a tie at the top must be broken) and the top label is kept."""

    decimals: int

    def __post_init__(self) -> None:
        self.check(self.decimals)

    @staticmethod
    def check(decimals: int) -> None:
        if not 0 <= decimals <= 12:
            raise ValueError(f"round: decimals must be between 0 and 12, got {decimals}")

    def __call__(self, probabilities: np.ndarray | list[list[float]],
                 features: np.ndarray | None = None) -> np.ndarray | list[list[float]]:
        # Row by row in plain Python: answers hold a few rows of a few classes, where each numpy
        # call costs several microseconds on the request path; large batches pay for it (README).
        # Lists stay lists (the middleware renders them as they are); an array gives an array.
        units = 10.0 ** self.decimals
        if not isinstance(probabilities, np.ndarray):
            return [round_row(row, units) for row in probabilities]
        rounded = [round_row(row, units) for row in probabilities.tolist()]
        return np.array(rounded, dtype=np.float64) if rounded else np.empty(probabilities.shape)


def round_row(row: list[float], units: float) -> list[float]:
    """``Round``'s apportionment of one row (non-negative, positive sum) in ``units`` per unit mass."""
    scale = units / sum(row)
    scaled = [value * scale for value in row]
    counts = [math.floor(value) for value in scaled]
    leftover = int(units) - sum(counts)  # in [0, k], exact: whole numbers
    # The ``leftover`` columns of largest remainder get one unit more (ties: the earlier column).
    for column in sorted(range(len(row)), key=lambda j: counts[j] - scaled[j])[:leftover]:
        counts[column] += 1
    # The top column never ends below another; where it ties or trails by a unit, move one unit.
    top, winner = row.index(max(row)), counts.index(max(counts))
    if winner != top:
        counts[winner] -= 1
        counts[top] += 1
    return [count / units for count in counts]


@dataclass(frozen=True)
class TopK(OutputDefence):
    """Keep the ``k`` most probable classes (earlier columns win ties), zero the rest, renormalise."""

    k: int

    def __post_init__(self) -> None:
        self.check(self.k)

    @staticmethod
    def check(k: int) -> None:
        if k < 1:
            raise ValueError(f"top_k: k must be at least 1, got {k}")

    def __call__(self, probabilities: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        return keep_top(normalise(np.where(ranks(-p) < self.k, p, 0.0)), p.argmax(axis=1))


@dataclass(frozen=True)
class LabelOnly(OutputDefence):
    """Only the predicted label: a one-hot row. On the wire the middleware renders it as the label
    itself, so no confidence survives."""

    def __call__(self, probabilities: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        one_hot = np.zeros(p.shape)
        one_hot[np.arange(len(p)), p.argmax(axis=1)] = 1.0
        return one_hot


def row_digests(secret: bytes, features: np.ndarray, prefix: bytes = b"") -> list[bytes]:
    """One HMAC-SHA256(secret, prefix + the row as little-endian float32) per feature row: float32 is
    the precision the model computes in, so queries that differ below it (``x + 1e-12``) reach the
    model as the same input and get the same digest."""
    rows = np.ascontiguousarray(features, dtype="<f4") + np.float32(0)  # + 0 maps -0.0 to 0.0
    return [hmac.digest(secret, prefix + row.tobytes(), hashlib.sha256) for row in rows]


def row_seeds(secret: bytes, features: np.ndarray) -> list[int]:
    """One 256-bit seed per feature row (``row_digests``): a repeated query, or one perturbed below
    float32, must get the same noise, or averaging them would strip it."""
    return [int.from_bytes(digest, "little") for digest in row_digests(secret, features)]


@dataclass(frozen=True)
class Noise(OutputDefence):
    """Multiply each probability by ``exp(scale * z)``, ``z`` standard normal, and renormalise;
    the top label is kept. ``z`` is drawn from a generator seeded by a keyed hash (HMAC-SHA256 with
    the server ``secret``) of the query's features at float32, the model's precision, so a repeated
    query, or one perturbed below that precision, gets the identical answer and averaging them
    gains nothing; without the secret the noise cannot be predicted. Perturbations at or above
    float32 resolution are distinct queries (near-duplicates, which the similarity detector sees)."""

    scale: float
    secret: bytes

    def __post_init__(self) -> None:
        self.check(self.scale)
        if not self.secret:
            raise ValueError("noise needs a non-empty server secret")

    @staticmethod
    def check(scale: float) -> None:
        if not scale > 0 or not np.isfinite(scale):
            raise ValueError(f"noise: scale must be a positive number, got {scale}")

    def __call__(self, probabilities: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        if features is None or len(features) != len(p):
            raise ValueError("noise needs one feature row per probability row")
        z = np.stack([np.random.default_rng(seed).standard_normal(p.shape[1])
                      for seed in row_seeds(self.secret, features)])
        return keep_top(normalise(p * np.exp(self.scale * z)), p.argmax(axis=1))


@dataclass(frozen=True)
class ReverseSigmoid(OutputDefence):
    """The reverse sigmoid perturbation of Lee et al. 2019, "Defending Against NN Model Stealing
    Attacks Using Deceptive Perturbations" (IEEE S&P Workshops), Section III:
    ``y - beta * (sigmoid(gamma * logit(y)) - 1/2)``, clipped at zero, renormalised, top label kept
    (a row clipped to all zeros becomes its top label, one-hot)."""

    beta: float
    gamma: float

    def __post_init__(self) -> None:
        self.check(self.beta, self.gamma)

    @staticmethod
    def check(beta: float, gamma: float) -> None:
        for name, value in (("beta", beta), ("gamma", gamma)):
            if not value > 0 or not np.isfinite(value):
                raise ValueError(f"reverse_sigmoid: {name} must be a positive number, got {value}")

    def __call__(self, probabilities: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        p = normalise(probabilities)
        perturbation = self.beta * (expit(self.gamma * logit(p)) - 0.5)
        q, top = np.maximum(p - perturbation, 0.0), p.argmax(axis=1)
        if not q.any(axis=1).all():  # beta >= 2 can clip a confident row to nothing: its top label remains
            emptied = ~q.any(axis=1)
            q[emptied, top[emptied]] = 1.0
        return keep_top(normalise(q), top)


@dataclass(frozen=True)
class Marks:
    """Which rows a ``Watermark`` picks: ``watermarked`` rows are answered with ``labels`` (keyed
    wrong labels); ``controls`` (about ``CONTROLS`` times as many) are answered truthfully and
    recorded with the label they would have got, for the verifier's null rate."""

    watermarked: np.ndarray
    controls: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Watermark(OutputDefence):
    """DAWN (Szyller, Atli, Marchal, Asokan, "DAWN: Dynamic Adversarial Watermarking of Neural
    Networks", ACM MM 2021; arXiv:1906.00830): a keyed hash (HMAC-SHA256 with the server ``secret``,
    as in DAWN's reference code, which compares 16 bits of it with ``rate``; 64 here) of the client
    and the query's features at float32 selects the query with probability ``rate`` (DAWN's default:
    0.005); a selected query's answer gets a wrong label, uniform over the other classes as in DAWN,
    chosen by the same hash so a repeated query gets the same answer and nothing the client sees
    without the secret tells which answers are watermarked. A probability row is rewritten by swapping its top
    entry with the wrong label's (rows still sum to one, the wrong label is on top, the vector keeps
    its shape); later stages (``round``, ``label_only``) keep that top label. The hash also picks
    ``CONTROLS`` times as many control queries, answered truthfully (``marks``)."""

    rate: float
    secret: bytes

    CONTROLS = 9
    """Control queries recorded per watermarked one: the verifier measures a suspect's own rate of
    agreeing with keyed wrong labels on them (``attacks.ownership``)."""

    def __post_init__(self) -> None:
        self.check(self.rate)
        if not self.secret:
            raise ValueError("watermark needs a non-empty server secret")

    @staticmethod
    def check(rate: float) -> None:
        if not 0 < rate <= 1 / (1 + Watermark.CONTROLS):
            raise ValueError(f"watermark: rate must be in (0, {1 / (1 + Watermark.CONTROLS):g}], got {rate}")

    def marks(self, top: np.ndarray | list[int], features: np.ndarray | list[list[float]], client: str,
              n_classes: int) -> Marks:
        """The rows ``client``'s query ``features`` (whose model labels among ``n_classes`` are
        ``top``) watermarks, its control rows, and each row's keyed wrong label. Row by row in plain
        Python: an answer holds a few rows, where each numpy call costs microseconds."""
        if features is None or len(features) != len(top):
            raise ValueError("watermark needs one feature row per probability row")
        low, high = self.rate * 2.0**64, self.rate * (1 + self.CONTROLS) * 2.0**64
        others = max(n_classes - 1, 1)
        marked, controls, labels = [], [], []
        for digest, label in zip(row_digests(self.secret, features, b"watermark\0" + client.encode() + b"\0"), top):
            draw = int.from_bytes(digest[:8], "little")
            marked.append(draw < low)
            controls.append(low <= draw < high)
            labels.append((int(label) + 1 + int.from_bytes(digest[8:16], "little") % others) % n_classes)
        return Marks(np.array(marked, dtype=bool), np.array(controls, dtype=bool), np.array(labels, dtype=np.int64))

    def __call__(self, probabilities: np.ndarray | list[list[float]], features: np.ndarray | None = None,
                 client: str = "", marks: Marks | None = None) -> np.ndarray | list[list[float]]:
        """The answers with the marked rows rewritten (``marks``: this query's, if already known);
        the input itself, lists or an array, when no row is marked."""
        p = np.asarray(probabilities, dtype=np.float64)
        top = p.argmax(axis=1)
        marks = marks or self.marks(top, features, client, p.shape[1])
        rows = np.flatnonzero(marks.watermarked)
        if not len(rows):
            return probabilities
        p = p.copy()
        wrong, right = marks.labels[rows], top[rows]
        p[rows, right], p[rows, wrong] = p[rows, wrong], p[rows, right]
        p[rows] = keep_top(p[rows], wrong)
        return p


@dataclass(frozen=True)
class Pipeline:
    """Output defences applied in order; ``label_only`` says whether the result is a bare label."""

    stages: tuple[OutputDefence, ...] = ()

    def __post_init__(self) -> None:
        _label_only_last([isinstance(stage, LabelOnly) for stage in self.stages])

    @classmethod
    def from_specs(cls, specs: list[str], secret: bytes | None = None) -> Pipeline:
        return cls(tuple(parse(spec, secret) for spec in specs))

    @functools.cached_property  # read on every request; an ABC's isinstance costs a microsecond
    def label_only(self) -> bool:
        return bool(self.stages) and isinstance(self.stages[-1], LabelOnly)

    @functools.cached_property
    def watermark(self) -> Watermark | None:
        """The pipeline's ``Watermark`` stage, if any (the middleware records what it marks)."""
        return next((stage for stage in self.stages if isinstance(stage, Watermark)), None)

    def __call__(self, probabilities: np.ndarray, features: np.ndarray | None = None,
                 client: str = "", marks: Marks | None = None) -> np.ndarray:
        """The stages applied in order; ``client`` keys the watermark (``marks``: its marks, if known)."""
        for stage in self.stages:
            probabilities = (stage(probabilities, features, client, marks) if stage is self.watermark
                             else stage(probabilities, features))
        return probabilities


def _label_only_last(label_only: list[bool]) -> None:
    """Refuse a label-only stage anywhere but last (``label_only``: whether each stage is one)."""
    if any(label_only[:-1]):
        raise ValueError("label_only must be the last output defence")


def _number(kind: Callable[[str], float | int], text: str, spec: str) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"output spec {spec!r}: {text!r} is not a valid {kind.__name__}") from None


_GRAMMAR: dict[str, tuple[Callable[..., OutputDefence], tuple[Callable[[str], float | int], ...]]] = {
    "round": (Round, (int,)),
    "top_k": (TopK, (int,)),
    "label_only": (LabelOnly, ()),
    "noise": (Noise, (float,)),
    "reverse_sigmoid": (ReverseSigmoid, (float, float)),
    "watermark": (Watermark, (float,)),
}


def read_spec(spec: str) -> tuple[str, tuple[float | int, ...]]:
    """The defence name and the arguments of a spec string (``round:D``, ``top_k:K``, ``label_only``,
    ``noise:S``, ``reverse_sigmoid:BETA:GAMMA`` or ``watermark:R``), checked against the defence's ranges; builds nothing."""
    name, *arguments = spec.strip().split(":")
    if name not in _GRAMMAR:
        raise ValueError(f"unknown output spec {spec!r}: use one of {', '.join(_GRAMMAR)}")
    build, kinds = _GRAMMAR[name]
    if len(arguments) != len(kinds):
        raise ValueError(f"output spec {spec!r}: {name} takes {len(kinds)} argument(s), got {len(arguments)}")
    values = tuple(_number(kind, text, spec) for kind, text in zip(kinds, arguments))
    build.check(*values)
    return name, values


def check_specs(specs: list[str]) -> None:
    """Raise ``ValueError`` unless ``specs`` make a pipeline: each spec valid, ``label_only`` last."""
    _label_only_last([read_spec(spec)[0] == "label_only" for spec in specs])


def parse(spec: str, secret: bytes | None = None) -> OutputDefence:
    """The defence a spec string names (``read_spec``); ``noise`` and ``watermark`` need the server
    ``secret``."""
    name, values = read_spec(spec)
    build = _GRAMMAR[name][0]
    if build in (Noise, Watermark):
        return build(*values, secret=secret or b"")
    return build(*values)
