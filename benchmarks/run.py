"""Run the before-and-after grid: train targets, serve them behind ``GuardMiddleware`` with each
defence, attack them through the real middleware, and collect one row per
dataset x model x defence x attack (summarised over seeds) for ``benchmarks.report``.

Attacks reach the model only over HTTP: in-process through httpx's ASGI transport, or, with
``live=True``, over a loopback socket to uvicorn. Every per-seed outcome is cached as JSON under
``out/cache`` so an interrupted or extended run skips the cells it already finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from fastapi import FastAPI

from attacks.ensemble import TrainingConfig
from attacks.targets import HTTPTarget, OutputUnavailable, TargetBlocked, TargetThrottled
from benchmarks import datasets, models, report
from benchmarks.scenarios import ATTACK_SPECS, DEFENCES, THREAT_MODELS, AttackSpec, Context, Defence
from guard.serving import prediction_app
from benchmarks.tabular import sensitive_breast_cancer
from guard import GuardMiddleware, Policy
from guard.dp import default_delta
from guard.identity import key_entry

TARGETS = {"digits": ("softmax", "mlp"), "breast_cancer": ("mlp",), "faces": ("softmax", "mlp"),
           "faces64": ("softmax", "mlp")}
DEFAULT_MAX_BODY_BYTES = 1 << 20  # the guard's default request-body limit


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; ``asdict`` of it is recorded in ``results.json``."""

    datasets: tuple[str, ...] = ("digits", "breast_cancer")  # faces on request: its MLP and black-box MI-Face are slow
    defences: tuple[str, ...] = tuple(DEFENCES)
    attacks: tuple[str, ...] = tuple(ATTACK_SPECS)
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    live: bool = False
    epochs: int | None = None  # None: the target recipe's epochs, sized to the data (models.Recipe.sized)
    model: str | None = None  # a user model factory "module:function" (n_features, n_classes) -> nn.Module
    hidden: int | None = None  # the target MLP's hidden units (None: the recipe's)
    activation: str | None = None  # the target MLP's activation (None: the recipe's)
    lr: float | None = None  # the target's learning rate (None: the recipe's)
    min_train_accuracy: float = 0.8  # refuse a target that fits its training set worse than this
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # the guard's request-body limit; batches are sized to it
    sensitive: str | None = None  # the sensitive column of users' data sets (attribute inference)
    command: str = ""
    training: dict[str, Any] = field(default_factory=lambda: asdict(TrainingConfig()))


QUICK = {"datasets": ("digits",), "seeds": (0,),
         "defences": ("none", "round:1", "label_only", "monitoring", "dp-eps8")}
"""What ``--quick`` narrows the grid to (one dataset and seed, five defences; every attack)."""


def targets(config: BenchConfig, dataset: str) -> tuple[str, ...]:
    """The model kinds attacked on ``dataset``: the zoo's, or the user's model."""
    return ("user",) if config.model else TARGETS.get(dataset, ("mlp",))


Group = tuple[str, str, int]
"""(dataset, model kind, seed): the cells that share trained models, run by one worker."""


def run(config: BenchConfig, out: Path, progress: bool = True, workers: int | None = None,
        threads: int = 1) -> dict[str, Path]:
    """Run the grid of ``config`` and write the report into ``out``. The (dataset, model, seed)
    groups run in ``workers`` processes (default: one per CPU core), each with ``threads`` torch
    threads; results do not depend on either."""
    from tqdm import tqdm

    groups = [(name, kind, seed) for name in config.datasets for kind in targets(config, name)
              for seed in config.seeds]
    workers = min(workers or os.cpu_count() or 1, len(groups))
    done: dict[Group, list[tuple[tuple, dict[str, Any]]]] = {}
    with tqdm(total=len(groups) * len(config.defences), desc="guard bench", disable=not progress,
              unit="cell") as bar:
        if workers == 1:
            _prepare_worker(threads)
            for group in groups:
                done[group] = run_group(config, out, group, bar.update)
        else:
            done = _run_in_processes(config, out, groups, workers, threads, bar.update)
    outcomes: dict[tuple, list[dict[str, Any]]] = {}
    for group in groups:
        for key, outcome in done[group]:
            outcomes.setdefault(key, []).append(outcome)
    rows = [row(key, ATTACK_SPECS[key[3].split(" (")[0]], results) for key, results in outcomes.items()]
    dp_delta = {name: default_delta(len(datasets.split(_dataset(name, config.sensitive)[0], config.seeds[0]).train))
                for name in config.datasets}  # the delta guard.dp defaults to (for the DP bound)
    return report.write(out, _recorded(config, dp_delta), rows)


def _run_in_processes(config: BenchConfig, out: Path, groups: list[Group], workers: int, threads: int,
                      advance) -> dict[Group, list[tuple[tuple, dict[str, Any]]]]:
    """``run_group`` for every group in a pool of spawned processes; ``advance(1)`` per finished cell."""
    import multiprocessing
    import queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context, initializer=_prepare_worker,
                                                            initargs=(threads,)) as pool:
        finished = manager.Queue()
        pending = {pool.submit(run_group, config, out, group, finished.put): group for group in groups}
        results = {}
        while pending:
            ready, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            with contextlib.suppress(queue.Empty):
                while True:
                    advance(finished.get_nowait())
            for future in ready:
                results[pending.pop(future)] = future.result()
        return results


def _prepare_worker(threads: int) -> None:
    import logging

    torch.set_num_threads(threads)
    logging.getLogger("guard.sanctions").setLevel(logging.ERROR)  # the report records every sanction


def run_group(config: BenchConfig, out: Path, group: Group, advance) -> list[tuple[tuple, dict[str, Any]]]:
    """Every defence and attack of one (dataset, model, seed): (row key, per-seed outcome) pairs.
    ``advance(1)`` is called after each defence (cell)."""
    name, kind, seed = group
    trained: dict[tuple, Any] = {}
    results = []
    for defence in (DEFENCES[d] for d in config.defences):
        context = _context(config, name, kind, defence, seed, trained)
        undefended = context if defence.dp_epsilon is None else _context(
            config, name, kind, DEFENCES["none"], seed, trained)
        utility = _utility(context, undefended.model, config)
        for spec in (ATTACK_SPECS[a] for a in config.attacks):
            reason = spec.requires(context)
            if reason and defence.name == config.defences[0]:
                key = (name, kind, defence.name, spec.name)
                results.append((key, {**_not_applicable(reason), "utility": utility, "seed": seed,
                                      "chance": 0.0, "adaptive": False}))
            if reason or not spec.applies(context):
                continue
            for keys in _key_counts(spec, defence):
                key = (name, kind, defence.name, spec.name if keys == 1 else f"{spec.name} ({keys} keys)")
                outcome = _cached(out / "cache", config, key, seed, lambda: _attack(spec, context, config, keys))
                chance = outcome["metrics"].get(f"reference_{spec.primary}")  # the no-model reference
                results.append((key, {**outcome, "utility": utility, "seed": seed,
                                      "chance": spec.chance(context) if chance is None else chance,
                                      "adaptive": spec.adaptive(context) or keys > 1}))
        advance(1)
    return results


SYBIL_KEYS = 20
BENIGN_KEY = "benign-user"
# The keys the bench's API has issued: the benign user's and the Sybil attacker's registered accounts.
ISSUED_KEYS = (BENIGN_KEY, *(f"attacker-{i}" for i in range(SYBIL_KEYS)))


def _key_counts(spec: AttackSpec, defence: Defence) -> tuple[int, ...]:
    """Against monitoring, every attack that queries the API also runs spread over many API keys
    (the Sybil attacker that per-client detectors such as PRADA cannot see), so monitoring is never
    credited for stopping an attacker who would simply have used more keys."""
    return (1, SYBIL_KEYS) if defence.monitoring and not spec.white_box else (1,)


def _not_applicable(reason: str) -> dict[str, Any]:
    """The outcome of an attack the data set cannot support, with the reason the report states."""
    return {"status": "not-applicable", "reason": reason, "metrics": {}, "queries": 0, "flagged_at": None,
            "blocked_at": None, "wall_time_s": 0.0, "curves": {}, "images": {}}


def policy(defence: Defence, detectors: dict[str, dict[str, Any]] | None = None,
           max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Policy:
    """The guard policy that serves ``defence`` on ``/predict``; ``detectors`` are the calibrated
    detector settings when ``defence.monitoring``."""
    route = {"probabilities": "/probabilities", "features": "/features", "output": list(defence.output)}
    settings: dict[str, Any] = {"secret": "predguard-benchmark-secret", "routes": {"/predict": route},
                                "max_body_bytes": max_body_bytes,
                                "identity": {"header": "X-API-Key", "keys": [key_entry(k) for k in ISSUED_KEYS]}}
    if defence.monitoring:  # cross-client alarms sanction every key they matched (Sybil keys)
        settings["detectors"] = detectors
        route["sanctions"] = {"accomplices": True}
        # The monitor judges off the request path; with one observation pending at most, a request
        # waits for the judgement of the one before it, so the attacker (who sends its next request
        # after the last answer) is caught from the request after the alarm, as the report counts.
        # A slow machine must not pass for a caught attacker: the wait may take up to 60 s.
        settings["monitor"] = {"max_pending": 1, "max_delay": 60.0}
    return Policy.from_dict(settings)


def guarded_app(context: Context, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A fresh prediction server for the context's model behind a fresh ``GuardMiddleware`` (no
    guard state carries over between attacks)."""
    model = context.model
    app = prediction_app(lambda X: models.predict_proba(model, X), context.dataset.n_features)
    app.add_middleware(GuardMiddleware, policy=policy(context.defence, context.detectors, max_body_bytes))
    return app


JSON_BYTES_PER_FEATURE = 26
"""The most a float64 feature takes in a JSON request body (``-0.00012345678901234567, ``)."""


def rows_per_request(n_features: int, max_body_bytes: int, most: int = 512) -> int:
    """How many feature rows fit one request body under the guard's limit ``max_body_bytes``."""
    return max(1, min(most, (max_body_bytes - 64) // (JSON_BYTES_PER_FEATURE * n_features + 4)))


def calibrated_detectors(dataset: datasets.Dataset, X_own: np.ndarray, labeller, seed: int,
                         quick: bool) -> dict[str, dict[str, Any]]:
    """Both detectors with thresholds calibrated to 0.1% false positives on benign traffic: natural
    variations of the defender's own data (``X_own``) sent by several simulated clients."""
    import asyncio

    from benchmarks.perf.detectors import benign_streams
    from guard.detectors.calibration import calibrate

    config = {"prada": {}, "similarity": {"quantization": 0.25, "window": min(8, dataset.n_features),
                                          "stride": 1, "top_n": 20}}
    clients, per_client = (8, 200) if quick else (20, 500)
    if dataset.image_shape is not None:
        streams = benign_streams(labeller, X_own, dataset.image_shape, clients, per_client, seed=seed)
    else:
        rng = np.random.default_rng(seed)
        streams = {}
        for client in range(clients):
            X = np.clip(X_own[rng.integers(len(X_own), size=per_client)]
                        + rng.normal(0, 0.03, (per_client, X_own.shape[1])), 0, 1).astype(np.float32)
            streams[f"benign-{client}"] = (X, labeller(X))
    thresholds = asyncio.run(calibrate(streams, config))
    return {name: {**config[name], **thresholds[name]} for name in config}


@contextlib.contextmanager
def http_target(app: FastAPI, n_classes: int, n_features: int, live: bool, api_keys: list[str],
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Iterator[HTTPTarget]:
    """An ``HTTPTarget`` for ``app``: in-process (ASGI transport) or over loopback to uvicorn, its
    requests sized to the guard's body limit."""
    # An attacker throttled for more than a second gives up: the bench records whether and when
    # monitoring throttled it, not how long a patient attacker would wait.
    options = {"n_features": n_features, "api_keys": api_keys, "max_wait": 1.0,
               "batch_size": rows_per_request(n_features, max_body_bytes)}
    if not live:
        with HTTPTarget("http://guarded/predict", n_classes, client=app, **options) as target:
            yield target
        return
    with _serve(app) as port, HTTPTarget(f"http://127.0.0.1:{port}/predict", n_classes, **options) as target:
        yield target


@contextlib.contextmanager
def _serve(app: FastAPI) -> Iterator[int]:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join()


def _context(config: BenchConfig, name: str, kind: str, defence: Defence, seed: int,
             trained: dict[tuple, Any]) -> Context:
    """The cell's data and models; ``trained`` memoises models shared by several cells."""
    dataset, sensitive = _dataset(name, config.sensitive)
    split = datasets.split(dataset, seed)
    training = TrainingConfig(**config.training)
    X_train, y_train = dataset.X[split.train], dataset.y[split.train]
    recipe = target_recipe(config, name, kind, len(split.train))
    model = _memo(trained, (name, kind, seed, defence.dp_epsilon),
                  lambda: _train_target(dataset, kind, recipe, X_train, y_train, defence, seed, config))
    held_out = split.held_out
    evaluator_model = _memo(trained, (name, "evaluator", seed), lambda: models.train_target(
        "mlp", dataset.X[held_out], dataset.y[held_out], dataset.n_classes, seed=seed + 1000,
        epochs=models.Recipe("mlp").sized(len(held_out)).epochs))
    context = Context(dataset, split, kind, recipe.hidden, training, defence, seed, config.quick, model,
                      _labeller(model), _labeller(evaluator_model), sensitive, activation=recipe.activation,
                      shared=trained)
    if defence.monitoring:
        context.detectors = _memo(trained, (name, kind, seed, "detectors"), lambda: calibrated_detectors(
            dataset, X_train, context.labels_of, seed, config.quick))
    return context


def target_recipe(config: BenchConfig, name: str, kind: str, n_train: int) -> models.Recipe:
    """The target's architecture and training: the zoo's recipe for the data set, with the user's
    choices (``--hidden``, ``--activation``, ``--lr``, ``--epochs``) over it; without ``--epochs``,
    sized to the data (``models.MIN_STEPS``)."""
    chosen = {"hidden": config.hidden, "activation": config.activation, "lr": config.lr, "epochs": config.epochs}
    recipe = replace(models.recipe(name, kind), **{k: v for k, v in chosen.items() if v is not None})
    return recipe if config.epochs else recipe.sized(n_train)


def _dataset(name: str, sensitive: str | None = None) -> tuple[datasets.Dataset, tuple[int, np.ndarray] | None]:
    """The records of dataset ``name`` and its sensitive attribute (column, values), if it has one
    (breast cancer: the coded "worst concave points" level; a user's file: ``sensitive``, or the one
    its NPZ names)."""
    if name == "breast_cancer" and sensitive is None:
        table = sensitive_breast_cancer()
        return table.dataset, (table.attribute, table.values)
    dataset = datasets.load(name, sensitive)
    return dataset, None if dataset.sensitive is None else (dataset.sensitive, dataset.sensitive_values)


def _labeller(model: torch.nn.Module):
    return lambda X: models.predict_proba(model, X).argmax(axis=1)


def _memo(trained: dict[tuple, Any], key: tuple, make) -> Any:
    if key not in trained:
        trained[key] = make()
    return trained[key]


def _train_target(dataset: datasets.Dataset, kind: str, recipe: models.Recipe, X: np.ndarray, y: np.ndarray,
                  defence: Defence, seed: int, config: BenchConfig) -> torch.nn.Module:
    """The target of one cell; refused (``models.Underfit``) when, trained without DP, it does not fit
    its own training set (DP-SGD's lower fit is its privacy cost, reported as utility). DP-SGD trains with
    its own recipe (``guard.dp.DP_RECIPE``), not the non-private one."""
    torch.manual_seed(seed)
    model = (_user_model(config.model, dataset) if kind == "user"
             else recipe.build(dataset.n_features, dataset.n_classes))
    if defence.dp_epsilon is None:
        models.train_recipe(model, recipe, X, y, seed)
        models.require_fit(model, X, y, config.min_train_accuracy, f"the {kind} target on {dataset.name} (seed {seed})")
        return model
    from guard.dp import DP_RECIPE, train_private

    private, _ = train_private(model, (X, y), target_epsilon=defence.dp_epsilon, seed=seed, **DP_RECIPE.options(len(X)))
    return private.eval()


def _user_model(factory: str, dataset: datasets.Dataset) -> torch.nn.Module:
    """``module:function`` called with ``(n_features, n_classes)``."""
    from guard.references import import_function

    return import_function(factory)(dataset.n_features, dataset.n_classes)


def _utility(context: Context, undefended: torch.nn.Module, config: BenchConfig) -> dict[str, float]:
    """Test accuracy of the defended answers, how often their top label differs from the undefended
    model's (for DP, the undefended model is the same architecture trained without DP), and whether
    the benign client asking for them was flagged (degraded, throttled or blocked: a false alarm)."""
    X_test, y_test = context.part("test")
    app = guarded_app(context, config.max_body_bytes)
    with http_target(app, context.dataset.n_classes, context.dataset.n_features, config.live,
                     [BENIGN_KEY], config.max_body_bytes) as target:
        labels = target.predict(X_test)
        flagged = any(value is not None for value in target.events.values())
    reference = models.predict_proba(undefended, X_test).argmax(axis=1)
    (X_train, y_train), held_out = context.part("train"), context.split.held_out
    return {"test_accuracy": float((labels == y_test).mean()),
            "label_change_rate": float((labels != reference).mean()), "benign_flagged": float(flagged),
            "target_train_accuracy": models.accuracy(context.model, X_train, y_train),
            "target_held_out_accuracy": models.accuracy(context.model, context.dataset.X[held_out],
                                                        context.dataset.y[held_out])}


def _attack(spec: AttackSpec, context: Context, config: BenchConfig, keys: int) -> dict[str, Any]:
    """One attack on one fresh guarded server."""
    api_keys = list(ISSUED_KEYS[1:keys + 1])
    with http_target(guarded_app(context, config.max_body_bytes), context.dataset.n_classes,
                     context.dataset.n_features, config.live, api_keys, config.max_body_bytes) as target:
        return attempt(spec, context, target)


def attempt(spec: AttackSpec, context: Context, target: HTTPTarget) -> dict[str, Any]:
    """Run one attack against ``target``: its measures, or why it could not finish ("stopped" when
    the endpoint throttled, degraded or blocked it; "not-applicable" when it lacks what it needs)."""
    started = time.perf_counter()
    try:
        result = spec.run(target, context)
        status, reason, metrics, artefacts = "ok", "", result.metrics, result.artefacts
    except (OutputUnavailable, TargetBlocked, TargetThrottled) as error:
        stopped = any(value is not None for value in target.events.values())
        status, reason, metrics, artefacts = "stopped" if stopped else "not-applicable", str(error), {}, {}
    events = target.events
    return {"status": status, "reason": reason, "metrics": {k: float(v) for k, v in metrics.items()},
            "queries": target.queries, "flagged_at": events["degraded_at"] if events["degraded_at"] is not None
            else events["throttled_at"], "blocked_at": events["blocked_at"],
            "wall_time_s": time.perf_counter() - started, "curves": _curves(artefacts),
            "images": _images(artefacts)}


def _curves(artefacts: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    curves = {}
    if "fpr" in artefacts:
        fpr, tpr = np.asarray(artefacts["fpr"]), np.asarray(artefacts["tpr"])
        keep = np.unique(np.searchsorted(fpr, np.logspace(-4, 0, 200)).clip(0, len(fpr) - 1))
        curves["roc"] = {"x": fpr[keep].tolist(), "y": tpr[keep].tolist()}
    if "curve" in artefacts:
        curve = artefacts["curve"]
        curves["agreement_vs_queries"] = {"x": list(map(float, curve["queries"])),
                                          "y": list(map(float, curve["agreement"]))}
    return curves


def _images(artefacts: dict[str, Any]) -> dict[str, list[list[float]]]:
    """The first ten reconstructions, and the images the attack put beside them (the victims' photos,
    the no-model reference)."""
    if "reconstructions" not in artefacts:
        return {}
    shown = {**artefacts.get("images", {}), "reconstructions": artefacts["reconstructions"]}
    return {name: np.asarray(images)[:10].round(3).tolist() for name, images in shown.items()}


def _cached(cache: Path, config: BenchConfig, key: tuple, seed: int, compute) -> dict[str, Any]:
    recipe = json.dumps({"key": key, "seed": seed, "quick": config.quick, "epochs": config.epochs,
                         "target": [config.hidden, config.activation, config.lr, config.sensitive],
                         "max_body_bytes": config.max_body_bytes,
                         "training": config.training, "live": config.live}, sort_keys=True)
    path = cache / f"{hashlib.sha256(recipe.encode()).hexdigest()[:20]}.json"
    if path.exists():
        return json.loads(path.read_text())
    outcome = compute()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outcome))
    return outcome


def row(key: tuple, spec: AttackSpec, results: list[dict[str, Any]]) -> report.Row:
    """The report row of one (dataset, model, defence, attack) over its per-seed outcomes."""
    dataset, model, defence, attack = key
    done = [r for r in results if r["status"] == "ok"]
    names = sorted({name for r in done for name in r["metrics"]})
    first = done[0] if done else results[0]
    return {
        "dataset": dataset, "model": model, "defence": defence, "attack": attack, "family": spec.family,
        "adaptive": any(r["adaptive"] for r in results),
        "status": "ok" if done else results[0]["status"],
        "reason": "" if done else results[0]["reason"],
        "primary": spec.primary, "chance": float(np.mean([r["chance"] for r in results])),
        "seeds": [r["seed"] for r in results],
        "metrics": {name: report.summarise([r["metrics"].get(name) for r in done]) for name in names},
        "queries": report.summarise([r["queries"] for r in results]),
        "flagged_at": [r["flagged_at"] for r in results],
        "blocked_at": [r["blocked_at"] for r in results],
        "utility": {name: report.summarise([r["utility"].get(name) for r in results])
                    for name in ("test_accuracy", "label_change_rate", "benign_flagged", "target_train_accuracy",
                                 "target_held_out_accuracy")},
        "wall_time_s": report.summarise([r["wall_time_s"] for r in results]),
        "curves": first["curves"], "images": first["images"],
    }


def _recorded(config: BenchConfig, dp_delta: dict[str, float]) -> dict[str, Any]:
    import opacus
    import sklearn

    versions = {"torch": torch.__version__, "numpy": np.__version__, "opacus": opacus.__version__,
                "scikit-learn": sklearn.__version__}
    return {**asdict(config), "dp_delta": dp_delta, "defence_specs": {name: asdict(DEFENCES[name]) for name in config.defences},
            "targets": {name: targets(config, name) for name in config.datasets}, "versions": versions,
            "threat_models": THREAT_MODELS,
            "image_shapes": {data.name: data.image_shape for data in (_dataset(name, config.sensitive)[0]
                                                                       for name in config.datasets)}}
