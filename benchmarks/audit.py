"""``guard audit``: black-box attacks against a live prediction endpoint the user runs, reported
like ``guard bench`` (one row per attack; defence "endpoint", and "none" for the undefended
``baseline`` server when one is given, so the report's verdicts compare the two as bench does).

The attacker's data is the user's dataset, split as in ``guard bench``: its ``aux`` part is the
attacker's pool, its ``test`` part measures fidelity; the attacker assumes no architecture (copies
and equation solving are linear). Attacks work on features scaled to [0, 1] (the box they sample
from), and every row is sent in the scale of the user's file (``scale=True``: sent scaled, for an
endpoint that takes scaled features). Fidelity and accuracy are measured against the endpoint's own
labels on the test part (the baseline's, when given), queried once with a separate key; those
measurement queries are reported apart from the attacks' own. Membership attacks need records of
known membership and are not run. Every attack asked for gets a row: its result, or why it could not
run.

Requests are written and answers read by the guard's own description of a route (a ``RoutePolicy``:
its features, probabilities, ``probabilities_flat`` and ``labels``), taken from the policy file
that guards the endpoint or built from the options, so the audit sends exactly what the guard reads.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from attacks.ensemble import TrainingConfig
from attacks.targets import HTTPTarget, TargetError
from benchmarks import datasets, models, report
from benchmarks.cells import attempt, row
from benchmarks.scenarios import ATTACK_SPECS, THREAT_MODELS, AttackSpec, Context, Defence
from guard.payload import answer_rows
from guard.policy import RoutePolicy

AUDIT_ATTACKS = ("equation-solving", "copycat", "knockoff-adaptive", "jacobian", "inverse-model", "mi-face-blackbox")
DEFAULT_BATCH = 256

# Why an attack's ``applies`` rule refuses an audit context, by attack name.
_NEEDS = {
    "equation-solving-rounding-aware": "rounded probabilities (the endpoint's answers are not rounded)",
    "mi-face": "white-box access to the model",
    "mi-face-blackbox": "image data and probabilities",
    "inverse-model": "image data (a dataset with an image shape, e.g. digits)",
    "map-attribute": "a sensitive attribute column",
    "lira-online": "probabilities and records of known membership",
    "lira-offline": "probabilities and records of known membership",
}


class AuditError(RuntimeError):
    """The endpoint cannot be audited: not allowed, unreachable, or answering an unexpected shape."""


def route_from_options(features_path: str | None = None, fields: tuple[str, ...] | None = None,
                       probabilities_path: str | None = None,
                       labels: tuple[str, ...] | None = None) -> RoutePolicy:
    """The route an endpoint's shape options describe: rows at ``features_path`` (default
    ``/features``), as objects of the named ``fields`` when given (``features_path`` empty: the body
    is one such object, or a list of them), answers at ``probabilities_path`` (default ``/probabilities``)."""
    features_path = "/features" if features_path is None else features_path
    features: str | list[str] | dict = features_path
    if fields:
        pointers = ["/" + name.replace("~", "~0").replace("/", "~1") for name in fields]
        features = pointers if features_path == "" else {"rows": features_path, "fields": pointers}
    return RoutePolicy(probabilities="/probabilities" if probabilities_path is None else probabilities_path,
                       features=features, labels=list(labels) if labels else None)


@dataclass(frozen=True)
class Endpoint:
    """How to talk to the endpoint: ``route`` (the guard's description of its request and answer
    shapes, and the class names in the dataset's class order), on top of ``example`` (the rest of a
    request body); ``batch_size`` rows per request (1: one row per request, not a batch; None:
    detect)."""

    url: str
    route: RoutePolicy
    example: Any = None
    batch_size: int | None = None
    scale: bool = False
    max_wait: float = 60.0
    one_hot_labels: bool = False  # its vectors are one-hot labels (``observed_output``): read as labels

    def check(self, n_features: int) -> None:
        """``AuditError`` unless requests of rows of ``n_features`` can be written for the route."""
        source = self.route.feature_source()
        if source is None:
            raise AuditError("the route names no features: the audit cannot write its requests")
        try:
            source.write(np.zeros((1, n_features)), False, self.example)
        except ValueError as error:
            raise AuditError(f"cannot write requests for this route: {error}") from error

    def target(self, dataset: datasets.Dataset, client: Any, progress: Callable[[int], None] | None = None,
               **options: Any) -> HTTPTarget:
        batch = self.batch_size or DEFAULT_BATCH
        source, where = self.route.feature_source(), self.route.probabilities_at()
        flat = len(self.route.labels) if self.route.probabilities_flat else None

        def write_body(rows: np.ndarray, single: bool) -> Any:
            return source.write(rows, single, self.example)

        def read_answers(document: Any, n: int, single: bool) -> list:
            return answer_rows(where.get(document), n, single, flat)

        return HTTPTarget(self.url, dataset.n_classes, batch_size=batch, single_rows=batch == 1,
                          class_labels=self.route.labels, encode=None if self.scale else dataset.raw,
                          n_features=dataset.n_features, client=client, max_wait=self.max_wait,
                          progress=progress, write_body=write_body, read_answers=read_answers,
                          one_hot_labels=self.one_hot_labels, **options)


def check_host(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """Only loopback endpoints, or hosts the user named with ``--allow-host``, are attacked."""
    host = urlsplit(url).hostname
    if host is None:
        raise AuditError(f"{url!r} is not an http(s) URL")
    if host in allowed_hosts:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise AuditError(f"cannot resolve {host}: {error}") from error
    if not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses):
        raise AuditError(f"{host} is not a loopback address; name it with --allow-host to audit it")


class Progress:
    """Progress lines on ``echo``: at most one every ``every`` seconds while an attack queries."""

    def __init__(self, echo: Callable[[str], None], every: float = 10.0) -> None:
        self.echo, self.every = echo, every
        self.last = time.monotonic()
        self.label = ""

    def __call__(self, queries: int) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.echo(f"  {self.label}: {queries} queries so far")


def audit(url: str, data: str, out: Path, *, route: RoutePolicy | None = None, example: Any = None,
          features_path: str | None = None, probabilities_path: str | None = None,
          api_keys: tuple[str, ...] = (), budget: int | None = None,
          attacks: tuple[str, ...] = AUDIT_ATTACKS, seed: int = 0, allowed_hosts: tuple[str, ...] = (),
          client: Any = None, fields: tuple[str, ...] | None = None, labels: tuple[str, ...] | None = None,
          batch_size: int | None = None, scale: bool | None = None, baseline: str | None = None,
          baseline_client: Any = None, max_wait: float = 60.0,
          echo: Callable[[str], None] = lambda line: None) -> dict[str, Path]:
    """Attack the endpoint at ``url`` (and the undefended ``baseline``, when given) with ``attacks``
    and write the report into ``out``. Its shapes: ``route`` (a policy's route; ``labels`` fills in
    class names it lacks), or the options of ``route_from_options``; ``example`` the rest of a
    request body. ``client``/``baseline_client`` (an ASGI app or httpx client) replace the network,
    for tests; ``echo`` receives progress lines. ``scale`` None: a bundled dataset is sent scaled
    (as ``guard demo`` and ``guard bench`` serve it), a file as it is."""
    for address, given in ((url, client), (baseline, baseline_client)):
        if address is not None and given is None:
            check_host(address, allowed_hosts)
    dataset = datasets.load(data)
    scale = data in datasets.BUNDLED if scale is None else scale
    split = datasets.split(dataset, seed)
    if route is None:
        route = route_from_options(features_path, fields, probabilities_path, labels)
    elif features_path is not None or probabilities_path is not None or fields:
        raise AuditError("the policy's route describes the request and answer shapes: drop the "
                         "features path, fields and probabilities path options")
    elif labels:
        if route.labels is not None:
            raise AuditError("the policy's route names its labels: drop the labels option")
        route = RoutePolicy.model_validate({**route.model_dump(), "labels": list(labels)})
    endpoint = Endpoint(url, route, example, batch_size, scale, max_wait)
    endpoint.check(dataset.n_features)
    echo(f"auditing {url} with {dataset.name}: {len(dataset.X)} rows of {dataset.n_features} features, "
         f"{dataset.n_classes} classes; features sent {'scaled to [0, 1]' if scale else 'as in the file'}")
    measuring = api_keys[:1]  # the endpoint's answers to the test set are read with the first key, if any
    endpoint = detect_batching(endpoint, dataset, split, client, echo, measuring)
    servers = [("endpoint", endpoint, client)]
    if baseline is not None:
        servers.insert(0, ("none", replace(endpoint, url=baseline), baseline_client))
    X_test, y_test = dataset.X[split.test].astype(np.float64), dataset.y[split.test]
    evaluator = Evaluator(dataset, split, seed, echo)
    rows, measurements, oracle, specs = [], [], None, {}
    progress = Progress(echo)
    with contextlib.ExitStack() as open_targets:
        for defence, server, server_client in servers:
            measurement = open_targets.enter_context(server.target(dataset, server_client, api_keys=measuring))
            measurements.append(measurement)
            answers = _probe(measurement, X_test)
            output, format_seen = observed_output(answers)
            echo(f"{server.url} answers {format_seen}")
            specs[defence] = {"output": list(output), "answers": format_seen}
            server = replace(server, one_hot_labels=answers.ndim == 2 and output == ("label_only",))
            endpoint_labels = answers.argmax(axis=1) if answers.ndim == 2 else answers
            measured = {X_test.tobytes(): endpoint_labels}

            def labels_of(X: np.ndarray, measured=measured, measurement=measurement) -> np.ndarray:
                key = np.asarray(X, dtype=np.float64).tobytes()
                if key not in measured:  # e.g. the uniform inputs every extraction attack is scored on
                    measured[key] = measurement.predict(np.asarray(X, dtype=np.float64))
                return measured[key]

            oracle = oracle or labels_of
            accuracy = float((endpoint_labels == y_test).mean())
            _warn_if_implausible(echo, server.url, endpoint_labels, accuracy, dataset.n_classes, scale)
            context = Context(dataset, split, "unknown", 64, TrainingConfig(), Defence(defence, output), seed,
                              False, None, oracle, evaluator)
            utility = {"test_accuracy": accuracy, "label_change_rate": None}
            for name in attacks:
                progress.label = f"{defence} {name}"
                outcome = _attack(ATTACK_SPECS[name], context, server, dataset, server_client, api_keys,
                                  budget, progress)
                echo(f"{defence} {name}: {_summary(ATTACK_SPECS[name], outcome, context)}")
                result = {**outcome, "utility": utility, "seed": seed, "chance": ATTACK_SPECS[name].chance(context),
                          "adaptive": False}
                rows.append(row((dataset.name, "endpoint", defence, name), ATTACK_SPECS[name], [result]))
    measurement_queries = sum(measurement.queries for measurement in measurements)
    config = {"command": "guard audit", "url": url, "baseline": baseline, "data": data, "seeds": [seed],
              "datasets": [dataset.name], "attacks": list(attacks), "budget": budget, "api_keys": len(api_keys),
              "batch_size": endpoint.batch_size, "scaled": scale, "measurement_queries": measurement_queries,
              "defence_specs": specs, "threat_models": THREAT_MODELS}
    return report.write(out, config, rows)


ROUNDINGS = range(1, 7)
"""Decimals an answer format is tested for being rounded to (``observed_output``)."""


def observed_output(answers: np.ndarray) -> tuple[tuple[str, ...], str]:
    """The endpoint's output format as its answers to the test part show it, as the guard's output
    specs (what a client loses, and what an adaptive attacker is told: ``Defence.public_format``),
    and in words: labels, or vectors that are all one-hot (labels only, e.g. ``top_k:1``), vectors
    rounded to a few decimals, or probabilities."""
    if answers.ndim == 1:
        return ("label_only",), "labels only"
    if np.isin(answers, (0.0, 1.0)).all() and (answers.sum(axis=1) == 1).all():
        return ("label_only",), "labels only (one-hot vectors, read as labels)"
    for decimals in ROUNDINGS:
        if np.allclose(answers, answers.round(decimals), rtol=0.0, atol=1e-9):
            return (f"round:{decimals}",), f"probabilities rounded to {decimals} decimals"
    return (), "probabilities"


class Evaluator:
    """The independent classifier that judges reconstructions, trained on data the endpoint's model
    never saw, when an inversion attack first needs it."""

    def __init__(self, dataset: datasets.Dataset, split: datasets.Split, seed: int,
                 echo: Callable[[str], None]) -> None:
        self.dataset, self.split, self.seed, self.echo = dataset, split, seed, echo
        self.model = None

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self.model is None:
            self.echo("training the independent evaluator of reconstructions")
            held_out = np.concatenate([self.split.test, self.split.aux])
            self.model = models.train_target("mlp", self.dataset.X[held_out], self.dataset.y[held_out],
                                             self.dataset.n_classes, seed=self.seed + 1000)
        return models.predict_proba(self.model, X).argmax(axis=1)


def detect_batching(endpoint: Endpoint, dataset: datasets.Dataset, split: datasets.Split, client: Any,
                    echo: Callable[[str], None], api_keys: tuple[str, ...] = ()) -> Endpoint:
    """``endpoint`` with its batch size: as given, or ``DEFAULT_BATCH`` when a batch of two rows is
    answered, 1 when the endpoint refuses it (400/422: it takes single rows)."""
    if endpoint.batch_size is not None:
        return endpoint
    batched = replace(endpoint, batch_size=DEFAULT_BATCH)
    with batched.target(dataset, client, api_keys=api_keys) as probe:
        try:
            probe.answer(dataset.X[split.test[:2]])
            return batched
        except TargetError as error:
            if error.status not in (400, 422):
                raise AuditError(f"{endpoint.url} answered in an unexpected shape: {error}") from error
        except httpx.TransportError as error:
            raise AuditError(f"cannot reach {endpoint.url}: {error}") from error
    echo(f"{endpoint.url} refused a batch of two rows: sending one row per request (--batch-size 1)")
    return replace(endpoint, batch_size=1)


def _attack(spec: AttackSpec, context: Context, server: Endpoint, dataset: datasets.Dataset, client: Any,
            api_keys: tuple[str, ...], budget: int | None, progress: Progress) -> dict[str, Any]:
    """One attack's outcome, or a "not-applicable" one that says why it did not run."""
    if spec.applies(context):
        with server.target(dataset, client, progress=progress, api_keys=api_keys, budget=budget) as target:
            return attempt(spec, context, target)
    if spec.white_box:
        why = "needs white-box access to the model"
    elif context.defence.public_format.label_only and spec.name in ("mi-face-blackbox", "lira-online", "lira-offline"):
        why = "needs probabilities; the endpoint answers labels only"
    else:
        why = "needs " + _NEEDS.get(spec.name, "what this endpoint and data do not offer")
    return {"status": "not-applicable", "reason": why, "metrics": {}, "queries": 0, "flagged_at": None,
            "blocked_at": None, "attacker_cost": None, "wall_time_s": 0.0, "curves": {}, "images": {}}


def _summary(spec: AttackSpec, outcome: dict[str, Any], context: Context) -> str:
    if outcome["status"] != "ok":
        return f"{outcome['status']}: {outcome['reason']}"
    value = outcome["metrics"].get(spec.primary)
    return (f"{spec.primary} {value:.3f} (chance {spec.chance(context):.3f}) after {outcome['queries']} queries"
            if value is not None else f"done after {outcome['queries']} queries")


def _warn_if_implausible(echo: Callable[[str], None], url: str, labels: np.ndarray, accuracy: float,
                         n_classes: int, scale: bool) -> None:
    """Say so when the endpoint's answers on the test part look like a feature mismatch."""
    echo(f"{url}: accuracy {accuracy:.3f} on the test part ({len(labels)} rows)")
    if len(np.unique(labels)) == 1 or accuracy < 1.5 / n_classes:
        hint = "--scale (the endpoint takes [0, 1] features?)" if not scale else "dropping --scale"
        echo(f"warning: {url} answered {len(np.unique(labels))} distinct classes, accuracy {accuracy:.3f}: "
             f"the features may not be what it expects (order of --fields, scale: try {hint}, --labels order)")


def _probe(target: HTTPTarget, X: np.ndarray) -> np.ndarray:
    """The endpoint's answers to ``X`` (vectors, or labels), or a clear ``AuditError``."""
    try:
        return target.answer(X)
    except httpx.TransportError as error:
        raise AuditError(f"cannot reach {target.url}: {error}") from error
    except (TargetError, ValueError) as error:
        hint = " (pass --labels with its class names, in the dataset's class order)" if "class_labels" in str(error) else ""
        raise AuditError(f"{target.url} answered in an unexpected shape: {error}{hint}") from error
