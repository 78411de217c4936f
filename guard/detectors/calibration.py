"""Set detector thresholds from benign traffic to a target false-positive rate, as Chen, Carlini &
Wagner ("Stateful Detection of Black-Box Adversarial Attacks", 2019, section 4) do: replay natural
query streams of several clients through a detector that never alarms, record its scores, and put
the threshold just beyond the benign scores that the target rate allows to alarm.

- PRADA judges clients: a client alarms once its ``W`` drops below ``delta``, so ``delta`` is chosen
  so that at most ``fpr`` of the benign clients ever reach it. Shapiro-Wilk grows more sensitive
  with more values, so natural distances that look normal at 500 can fail at 2000: a ``delta``
  calibrated on streams of ``n`` queries only holds for ``W`` over at most ``n`` distances, and
  calibration also bounds ``max_distances`` (the window ``W`` is computed on) by the longest benign
  stream. Longer benign streams give a longer window.
- The similarity detector judges queries: ``threshold`` is chosen so that at most ``fpr`` of the
  benign queries reach it.

The result is a plain dict (``{"prada": {"delta": ...}, "similarity": {"threshold": ...}}``) that a
policy stores; ``write_policy`` merges it into a TOML or YAML policy file.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from guard.detectors import build_detector
from guard.detectors.base import Detector
from guard.detectors.prada import Prada
from guard.store.memory import MemoryStore

Stream = tuple[np.ndarray, np.ndarray]
"""One client's queries in order: features ``(n, d)`` and the model's predicted labels ``(n,)``."""


def interleave(streams: Mapping[str, Stream]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The clients' queries one at a time (``client, features (1, d), labels (1,)``), round-robin,
    as concurrent clients arrive."""
    longest = max((len(features) for features, _ in streams.values()), default=0)
    for step in range(longest):
        for client, (features, predicted) in streams.items():
            if step < len(features):
                yield client, features[step : step + 1], predicted[step : step + 1]


def with_retries(streams: Mapping[str, Stream], rate: float, repeats: int, seed: int = 0) -> dict[str, Stream]:
    """The streams with retries, as real clients send them: each query, with probability ``rate``,
    is sent ``repeats`` more times in a row. Calibrate on these when clients retry."""
    rng = np.random.default_rng(seed)
    retried = {}
    for client, (features, predicted) in streams.items():
        counts = 1 + repeats * (rng.random(len(features)) < rate)
        retried[client] = (np.repeat(features, counts, axis=0), np.repeat(predicted, counts, axis=0))
    return retried


async def replay(detector: Detector, streams: Mapping[str, Stream]) -> dict[str, np.ndarray]:
    """Feed the clients' interleaved streams to ``detector`` and return each client's score after
    each of its queries."""
    scores: dict[str, list[float]] = {client: [] for client in streams}
    for client, features, predicted in interleave(streams):
        scores[client].append((await detector.observe(client, features, predicted)).score)
    return {client: np.asarray(values) for client, values in scores.items()}


def _prada_window(settings: Mapping[str, Any], streams: Mapping[str, Stream]) -> int:
    """PRADA's ``max_distances`` bounded by the longest benign stream (and above its ``min_distances``)."""
    defaults = {name: p.default for name, p in inspect.signature(Prada).parameters.items()}
    horizon = max(len(features) for features, _ in streams.values())
    floor = settings.get("min_distances", defaults["min_distances"]) + 1
    return min(settings.get("max_distances", defaults["max_distances"]), max(horizon, floor))


def _tolerated(values: np.ndarray, fpr: float) -> float:
    """The largest value that must not alarm: beyond it lie at most ``fpr`` of ``values``."""
    return float(np.sort(values)[::-1][min(math.floor(fpr * len(values)), len(values) - 1)])


async def calibrate(
    streams: Mapping[str, Stream], config: Mapping[str, Mapping[str, Any]], fpr: float = 0.001
) -> dict[str, dict[str, float]]:
    """Thresholds for the detectors named in ``config`` (name -> their other settings) that give a
    false-positive rate of at most ``fpr`` on the benign ``streams`` (client -> its queries).
    Use streams from other clients and data than those the thresholds will be judged on."""
    if not streams:
        raise ValueError("calibration needs at least one benign client stream")
    thresholds: dict[str, dict[str, float]] = {}
    for name, settings in config.items():
        if name == "prada":
            never = {**settings, "delta": 0.0}
            scores = await replay(build_detector(name, never, MemoryStore()), streams)
            worst = np.array([values.max(initial=0.0) for values in scores.values()])
            thresholds[name] = {"delta": 1.0 - _tolerated(worst, fpr),
                                "max_distances": _prada_window(settings, streams)}
        elif name == "similarity":
            never = {**settings, "threshold": math.inf}
            scores = await replay(build_detector(name, never, MemoryStore()), streams)
            thresholds[name] = {
                "threshold": _tolerated(np.concatenate(list(scores.values())), fpr) + 1
            }
        else:
            raise ValueError(f"no calibration rule for detector {name!r}")
    return thresholds


def adequacy(streams: Mapping[str, Stream], config: Mapping[str, Mapping[str, Any]],
             fpr: float) -> list[str]:
    """What ``streams`` cannot support, one line each: PRADA streams too short to give it a single
    ``W`` (its threshold would be meaningless, ``delta = 1``); fewer clients (PRADA judges clients) or
    queries (similarity judges queries) than ``1 / fpr``, so the rate cannot be measured as low as the
    target and the threshold would only be the most lenient value seen, with no margin."""
    errors = []
    lengths = [len(features) for features, _ in streams.values()]
    for name, settings in config.items():
        if name == "prada":
            floor = settings.get("min_distances", inspect.signature(Prada).parameters["min_distances"].default)
            if min(lengths) <= floor + 1:
                errors.append(f"prada: the shortest benign stream has {min(lengths)} queries; PRADA needs "
                              f"more than {floor + 1} per client to judge it: give more data, fewer "
                              f"--clients, or a smaller min_distances")
            if len(streams) * fpr < 1:
                errors.append(f"prada: {len(streams)} benign clients cannot show a false-alarm rate of "
                              f"{fpr:g} per client (the least they can show is 1/{len(streams)}): use "
                              f"--fpr {1 / len(streams):.3g} or more, or more data and --clients")
        elif name == "similarity" and sum(lengths) * fpr < 1:
            errors.append(f"similarity: {sum(lengths)} benign queries cannot show a false-alarm rate of "
                          f"{fpr:g} per query: use --fpr {1 / sum(lengths):.3g} or more, or more data")
    return errors


def expected_false_alarms(calibrated_on: int, fpr: float) -> float:
    """The expected false-alarm rate on fresh benign clients (PRADA) or queries (similarity) of a
    threshold ``calibrate`` set from ``calibrated_on`` of them: it lies beyond the ``k``-th highest
    benign score, ``k = floor(fpr * n) + 1``, which a fresh exchangeable score exceeds with probability
    ``k / (n + 1)`` (at most that, with ties): close to ``fpr`` only once ``fpr * n >> 1``."""
    rank = min(math.floor(fpr * calibrated_on), calibrated_on - 1) + 1
    return rank / (calibrated_on + 1)


def deal(X: np.ndarray, y: np.ndarray, clients: int, seed: int = 0) -> dict[str, Stream]:
    """The rows ``(X, y)`` shuffled (seeded) and dealt round-robin into ``clients`` benign streams."""
    order = np.random.default_rng(seed).permutation(len(X))
    X, y = X[order], y[order]
    return {f"benign-{i}": (X[i::clients], y[i::clients]) for i in range(clients)}


def hold_out(streams: Mapping[str, Stream], fraction: float) -> tuple[dict[str, Stream], dict[str, Stream]]:
    """The streams split by client into (calibration, held out): ``fraction`` of the clients, at
    least one, are held out to measure the false alarms the thresholds cause."""
    if len(streams) < 2:
        raise ValueError("holding out clients needs at least two benign streams")
    clients = list(streams)
    held = max(1, round(fraction * len(clients)))
    return ({c: streams[c] for c in clients[held:]}, {c: streams[c] for c in clients[:held]})


async def false_alarms(streams: Mapping[str, Stream], config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Replay ``streams`` through each detector of ``config`` (with its thresholds) and count its
    alarms: the share of clients alarmed at least once, and of queries that alarmed."""
    rates = {}
    for name, settings in config.items():
        detector = build_detector(name, dict(settings), MemoryStore())
        alarmed: dict[str, int] = {client: 0 for client in streams}
        queries = 0
        for client, features, predicted in interleave(streams):
            alarmed[client] += (await detector.observe(client, features, predicted)).alarm
            queries += 1
        rates[name] = {"clients": sum(count > 0 for count in alarmed.values()) / len(streams),
                       "queries": sum(alarmed.values()) / max(queries, 1)}
    return rates


def write_policy(
    path: str | Path, thresholds: Mapping[str, Mapping[str, float]], section: str = "detectors"
) -> None:
    """Merge ``thresholds`` into the ``[section.<detector>]`` tables of a TOML policy file (through
    tomlkit, which keeps its comments and layout), or the ``section: {detector: ...}`` mapping of a
    YAML one (its comments are not kept), chosen by the file's suffix; the file is created if absent."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if path.suffix == ".toml":
        import tomlkit

        document = tomlkit.parse(text)
        detectors = document.setdefault(section, tomlkit.table(is_super_table=True))
        for name, values in thresholds.items():
            if name not in detectors:
                detectors[name] = tomlkit.table()
            detectors[name].update(values)
        path.write_text(tomlkit.dumps(document))
        return
    import yaml

    document = yaml.safe_load(text) or {}
    detectors = document.setdefault(section, {})
    for name, values in thresholds.items():
        detectors.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
