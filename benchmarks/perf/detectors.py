"""Detector benchmark: per-query cost against history size, and detection on query streams.

Run: ``python -m benchmarks.perf.detectors [--quick]``.

- ``cost``: median seconds per query of PRADA and the similarity detector after histories of 1k, 10k
  and 100k queries of 784-dimensional inputs (uniform noise: every window distinct, the worst case
  for hashing), side by side with the ratio to the 1k history.
- ``delay``: on digits, the queries until each detector flags a Jacobian-augmentation stream and a
  line-search stream (one API key, and spread over 20 keys), and the false alarms on benign
  clients, with thresholds calibrated on other benign clients and data.
- ``sanction delay``: the same streams through the real middleware with the monitor off the
  request path: queries until the attacker's first answer without probabilities, under the
  monitor's bounds (one pending observation, and the defaults) and with 1 or 8 requests in flight;
  the delay is the extra queries answered in full compared with the first (where each sanction
  applies from the query after its alarm, as with the detectors on the request path).

The streams come from ``benchmarks.traffic``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from benchmarks import datasets, models
from benchmarks.perf.attacks import Rows, print_table
from benchmarks.traffic import Oracle, benign_streams, jacobian_stream, line_search_stream, spread
from guard.detectors import build_detector
from guard.detectors.base import Detector
from guard.detectors.calibration import Stream, calibrate, interleave, replay
from guard.store.memory import MemoryStore

DIGITS_SIMILARITY = {"quantization": 0.25, "window": 8, "stride": 1, "top_n": 20, "salt": "bench"}
"""Similarity-detector settings for 8x8 digits (Blacklight's are for 784-pixel images)."""


async def first_alarm(detector: Detector, streams: Mapping[str, Stream]) -> int | None:
    """Queries sent in all (streams interleaved round-robin) up to and including the first that
    raises an alarm, or None if none does."""
    for sent, (client, features, labels) in enumerate(interleave(streams), start=1):
        if (await detector.observe(client, features, labels)).alarm:
            return sent
    return None


def _cost(quick: bool) -> Rows:
    """Median seconds per single-query ``observe`` after each history size, one client, uniform
    784-dimensional inputs over 10 classes, fed in batches of 500."""
    histories, probes = ((1_000, 10_000), 50) if quick else ((1_000, 10_000, 100_000), 200)
    rng = np.random.default_rng(0)
    rows: Rows = []
    for name in ("prada", "similarity"):
        detector = build_detector(
            name, {"salt": "bench"} if name == "similarity" else {}, MemoryStore()
        )
        seen, medians = 0, {}
        for history in histories:
            while seen < history:
                batch = min(500, history - seen)
                asyncio.run(
                    detector.observe("c", rng.random((batch, 784)), rng.integers(0, 10, batch))
                )
                seen += batch
            medians[history] = float(np.median(asyncio.run(_probe(detector, rng, probes))))
            seen += probes
        first = medians[histories[0]]
        rows += [
            {
                "detector": name,
                "history": history,
                "median_s_per_query": seconds,
                "ratio_to_1k": seconds / first,
            }
            for history, seconds in medians.items()
        ]
    return rows


async def _probe(detector: Detector, rng: np.random.Generator, probes: int) -> list[float]:
    times = []
    for _ in range(probes):
        query, label = rng.random((1, 784)), rng.integers(0, 10, 1)
        start = time.perf_counter()
        await detector.observe("c", query, label)
        times.append(time.perf_counter() - start)
    return times


@functools.cache
def _digits_setting() -> tuple[Any, Oracle, dict[str, dict[str, Any]], dict[str, Any], dict[str, Stream]]:
    """The digits target, its labelling, the calibrated thresholds and detector settings, and the
    attack streams (from the auxiliary part)."""
    digits = datasets.load("digits")
    split = datasets.split(digits, seed=0)
    target = models.train_target(
        "mlp", digits.X[split.train], digits.y[split.train], digits.n_classes, seed=0, epochs=60
    )

    def oracle(X: np.ndarray) -> np.ndarray:
        return models.predict_proba(target, X).argmax(axis=1)

    config: dict[str, dict[str, Any]] = {"prada": {}, "similarity": DIGITS_SIMILARITY}
    calibration = benign_streams(
        oracle, digits.X[split.train], digits.image_shape, 20, 500, seed=1, prefix="calibration"
    )
    thresholds = asyncio.run(calibrate(calibration, config))
    settings = {name: {**config[name], **thresholds[name]} for name in config}
    aux = digits.X[split.aux].astype(np.float32)
    rng = np.random.default_rng(1)
    starts, ends = aux[rng.integers(len(aux), size=40)], aux[rng.integers(len(aux), size=40)]
    attacks = {
        "jacobian": jacobian_stream(oracle, aux[:50], digits.n_classes, rounds=3),
        "jacobian-long": jacobian_stream(oracle, aux[:50], digits.n_classes, rounds=6),
        "line-search": line_search_stream(oracle, starts, ends),
    }
    return target, oracle, thresholds, settings, attacks


def _delay(quick: bool) -> Rows:
    """Queries until the first alarm per stream, and false alarms on held-out benign clients, on
    digits with thresholds calibrated (0.1%) on 20 clients x 500 variations of the target-train
    part; benign clients use the test part, attacks the auxiliary part (as in
    tests/test_detection_streams.py)."""
    _target, oracle, thresholds, settings, attacks = _digits_setting()
    digits = datasets.load("digits")
    split = datasets.split(digits, seed=0)
    config = {name: {} for name in settings}
    rows: Rows = []
    for stream, queries in attacks.items():
        for keys in (1, 20):
            streams = {"attacker": queries} if keys == 1 else spread(queries, keys)
            for name in config:
                detector = build_detector(name, settings[name], MemoryStore())
                rows.append(
                    {
                        "detector": name,
                        "threshold": str(thresholds[name]),
                        "stream": stream,
                        "keys": keys,
                        "queries": len(queries[0]),
                        "first_alarm": asyncio.run(first_alarm(detector, streams)),
                    }
                )
    for seed in (2,) if quick else (2, 3, 4):
        benign = benign_streams(
            oracle, digits.X[split.test], digits.image_shape, 20, 500, seed=seed, prefix="held-out"
        )
        for name in config:
            scores = asyncio.run(
                replay(build_detector(name, settings[name], MemoryStore()), benign)
            )
            if name == "prada":
                alarms = sum(
                    bool((1 - values[values > 0] < settings[name]["delta"]).any())
                    for values in scores.values()
                )
                unit = "clients of 20"
            else:
                alarms = int(
                    sum((values >= settings[name]["threshold"]).sum() for values in scores.values())
                )
                unit = "queries of 10000"
            rows.append(
                {
                    "detector": name,
                    "threshold": str(thresholds[name]),
                    "stream": f"benign (seed {seed})",
                    "keys": 20,
                    "queries": 10_000,
                    "false_alarms": f"{alarms} {unit}",
                }
            )
    return rows


SANCTION_RUNS = [({"max_pending": 1, "max_delay": 60.0}, 1), ({"max_pending": 256, "max_delay": 60.0}, 1),
                 ({"max_pending": 256, "max_delay": 60.0}, 8), ({"max_pending": 256, "max_delay": 0.02}, 8)]
"""(monitor bound, requests in flight) compared; the first is the reference (what ``guard bench``
uses), the last the defaults under a pipelining attacker."""


def _sanction_delay(quick: bool) -> Rows:
    """Queries until caught through the real middleware (digits MLP app, in-process monitor,
    calibrated detectors, cross-client alarms sanctioning the keys they matched): the attacker sends
    one query per request, over 1 or 20 keys, with 1 or 8 requests in flight, and is caught at its
    first answer without probabilities (degraded, throttled or blocked). The delay is the extra
    queries answered in full compared with one pending observation at most and one request in
    flight, where each sanction applies from the query after its alarm, as with the detectors on the
    request path. ``dropped``: answers sent label-only because the monitor was behind its bound
    (a fault, not a detection: a run with any has no delay figure)."""
    target, _oracle, _thresholds, settings, attacks = _digits_setting()
    rows: Rows = []
    for stream, (features, _labels) in attacks.items():
        if quick and stream == "jacobian-long":
            continue
        for keys in (1, 20):
            reference = None
            for bound, flight in SANCTION_RUNS:
                at, dropped = asyncio.run(_caught_at(target, settings, bound, features, keys, flight))
                reference = at if reference is None else reference
                rows.append({"stream": stream, "keys": keys, "bound": f"{bound['max_pending']} obs / "
                             f"{bound['max_delay']:g} s", "in flight": flight, "queries": len(features),
                             "caught at": at, "dropped": dropped,
                             "delay (queries)": None if at is None or dropped else at - reference})
    return rows


async def _caught_at(target: torch.nn.Module, settings: dict[str, dict[str, Any]], bound: dict[str, Any],
                     features: np.ndarray, keys: int, in_flight: int) -> tuple[int | None, int]:
    """The 1-based index (in sending order) of the first answer without probabilities (or None),
    and how many answers the guard sent in the fail mode because its monitor was behind."""
    import httpx

    from guard.serving import prediction_app
    from guard import GuardMiddleware, Policy

    policy = Policy(secret="detector benchmark secret", detectors=settings, monitor=bound, routes={"/predict": {
        "probabilities": "/probabilities", "features": "/features", "sanctions": {"accomplices": True}}})
    app = prediction_app(lambda X: models.predict_proba(target, X), features.shape[1])
    app.add_middleware(GuardMiddleware, policy=policy)
    answers: dict[int, bool] = {}
    queue = iter(range(len(features)))

    async def attacker(client: httpx.AsyncClient) -> None:
        for i in queue:
            answer = await client.post("/predict", json={"features": features[i].tolist()},
                                       headers={"x-api-key": f"sybil-{i % keys}"})
            answers[i] = answer.status_code == 200 and isinstance(answer.json()["probabilities"], list)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guarded") as client:
        await asyncio.gather(*(attacker(client) for _ in range(in_flight)))
    guard = app.middleware_stack
    while not isinstance(guard, GuardMiddleware):
        guard = guard.app
    await guard.monitoring.monitor.stop()  # as the server's shutdown would: judge what is queued, here
    dropped = guard.monitoring.metrics.registry.get_sample_value("guard_observations_dropped_total")
    return next((i + 1 for i in range(len(features)) if not answers[i]), None), int(dropped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="histories up to 10k, one benign seed")
    args = parser.parse_args(argv)
    print_table("detector cost per query against history (784-d inputs)", _cost(args.quick))
    print_table("detection delay and false alarms (digits)", _delay(args.quick))
    print_table("sanction delay through the middleware, monitor off the request path (digits)",
                _sanction_delay(args.quick))


if __name__ == "__main__":
    main()
