"""One cell of the grid: the target of one defence, its utility, and every attack on it through the
real middleware, with the models it needs made once and kept in ``benchmarks.cache``.

``run_cell`` is what an executor runs; it returns (row key, per-seed outcome) pairs, and ``row``
summarises a row's outcomes over seeds for ``benchmarks.report``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.ensemble import TrainingConfig
from attacks.sybil import KeyRotatingTarget
from attacks.targets import HTTPTarget, OutputUnavailable, QueryBudgetExceeded, TargetBlocked, TargetThrottled
from benchmarks import datasets, models, ownership, report
from benchmarks.cache import Cache, digest
from benchmarks.endpoint import (
    ATTACKER_KEYS,
    BENIGN_KEY,
    KEY_POOL,
    KEY_RATE_PER_HOUR,
    SYBIL_KEYS,
    guarded_app,
    http_target,
    rotating_target,
)
from benchmarks.grid import BenchConfig, Cell, attacks_on, recipe
from benchmarks.scenarios import ATTACK_SPECS, DEFENCES, AttackSpec, Context, Defence
from benchmarks.tabular import sensitive_breast_cancer
from benchmarks.traffic import benign_rows, benign_streams

Outcomes = list[tuple[tuple, dict[str, Any]]]


@dataclass(frozen=True)
class CellTask:
    """What an executor ships to a worker: the run's configuration, the cache folder, the cell."""

    config: BenchConfig
    cache: Path
    cell: Cell


def cell_key(config: BenchConfig, cell: Cell, *detail: Any) -> str:
    """The cache key of ``cell`` (and ``detail``: an attack and its key count) under ``config``: the
    whole recipe of the run, the cell and the content of its data."""
    return digest("cell", recipe(config), cell, data_digest(cell.dataset, config.sensitive), *detail)


def run_cell(task: CellTask) -> Outcomes:
    """Every attack of the run on the cell's defence: (row key, per-seed outcome) pairs."""
    return defence_outcomes(task, DEFENCES[task.cell.defence])


def defence_outcomes(task: CellTask, defence: Defence, adaptive: bool = True) -> Outcomes:
    """Every attack of the run on ``defence`` (the cell's, or one built outside ``DEFENCES``, e.g. a
    watermark at another rate); where it watermarks, the ownership family's rows too: each extraction
    copy verified (``benchmarks.ownership``) and, for the watermark alone, with ``adaptive`` and
    outside ``--quick``, the adaptive copiers."""
    config, cell = task.config, task.cell
    store = Cache(task.cache)
    group = digest("group", recipe(config), cell.model, cell.seed, data_digest(cell.dataset, config.sensitive))

    def shared(key: tuple, make: Callable[[], Any]) -> Any:
        return store.model(digest(group, key), make)

    context = _context(config, cell, defence, shared)
    undefended = context.model if defence.dp_epsilon is None else _target(config, cell, DEFENCES["none"], shared)
    utility = _utility(context, undefended, config)
    watermarks = ownership.rate_of(defence) is not None
    cost = {"accuracy_cost": models.accuracy(undefended, *context.part("test")) - utility["test_accuracy"]}
    dp_audit = _dp_audit(config, cell, defence, shared)
    results, chosen = [], attacks_on(config, defence.name)
    for spec in (ATTACK_SPECS[a] for a in config.attacks):
        reason = spec.requires(context)
        if reason and defence.name == config.defences[0]:
            results.append(((cell.dataset, cell.model, defence.name, spec.name),
                            {**_not_applicable(reason), "utility": utility, "seed": cell.seed, "chance": 0.0,
                             "adaptive": False, "dp_audit": dp_audit}))
        if reason or not spec.applies(context) or spec.name not in chosen:
            continue
        if spec.family == "inversion" and defence.dp_public:
            continue  # the evaluator that judges reconstructions trains on the aux part, which pretrained this target
        for attacker in _attackers(spec, defence):
            key = (cell.dataset, cell.model, defence.name,
                   spec.name if attacker == ONE_KEY else f"{spec.name} ({attacker})")
            verify = watermarks and spec.family == "extraction"
            outcome = store.outcome_or(cell_key(config, cell, spec.name, attacker, verify),
                                       lambda: _attack(spec, context, config, attacker, verify))
            chance = outcome["metrics"].get(f"reference_{spec.primary}")  # the no-model reference
            results.append((key, {**outcome, "utility": utility, "seed": cell.seed,
                                  "chance": spec.chance(context) if chance is None else chance,
                                  "adaptive": spec.adaptive(context) or attacker != ONE_KEY, "dp_audit": dp_audit}))
            if outcome.get("ownership"):
                metrics = {**outcome["ownership"], **cost, "agreement_test": outcome["metrics"]["agreement_test"]}
                results.append(((*key[:3], ownership.PREFIX + key[3]),
                                {**ownership.row_outcome(outcome, metrics), "utility": utility, "seed": cell.seed}))
    if watermarks and adaptive and len(defence.output) == 1 and not config.quick:
        copiers = store.outcome_or(cell_key(config, cell, "ownership-adaptive"), lambda: [
            list(pair) for pair in ownership.adaptive_outcomes(context, config.max_body_bytes)])
        results += [((cell.dataset, cell.model, defence.name, ownership.PREFIX + name),
                     {**outcome, "metrics": {**outcome["metrics"], **cost}, "utility": utility, "seed": cell.seed})
                    for name, outcome in copiers]
    return results


def spec_of(attack: str) -> AttackSpec:
    """The spec of a row's attack name (``copycat (rotating 20 of 200 keys)``: copycat; ``ownership: ...``:
    the family's)."""
    return ownership.OWNERSHIP if attack.startswith(ownership.PREFIX) else ATTACK_SPECS[attack.split(" (")[0]]


ONE_KEY = "one key"
ROTATING = f"rotating {SYBIL_KEYS} of {KEY_POOL} keys"


def _attackers(spec: AttackSpec, defence: Defence) -> tuple[str, ...]:
    """Against monitoring, every attack that queries the API also runs as the key-rotating Sybil attacker
    (``attacks.sybil``: ``SYBIL_KEYS`` keys at once, each sanctioned one dropped and its rows resent through
    a fresh key of ``KEY_POOL``), so monitoring is credited with what it makes stealing cost, never with
    stopping an attacker who would simply have used more keys."""
    return (ONE_KEY, ROTATING) if defence.monitoring and not spec.white_box else (ONE_KEY,)


def _not_applicable(reason: str) -> dict[str, Any]:
    """The outcome of an attack the data set cannot support, with the reason the report states."""
    return {"status": "not-applicable", "reason": reason, "metrics": {}, "queries": 0, "flagged_at": None,
            "blocked_at": None, "attacker_cost": None, "wall_time_s": 0.0, "curves": {}, "images": {}}


def calibrated_detectors(dataset: datasets.Dataset, X_own: np.ndarray, labeller, seed: int,
                         quick: bool) -> dict[str, dict[str, Any]]:
    """Both detectors with thresholds calibrated to 0.1% false positives on benign traffic: natural
    variations of the defender's own data (``X_own``) sent by several simulated clients."""
    import asyncio

    from guard.detectors.calibration import calibrate

    config = {"prada": {}, "similarity": {"quantization": 0.25, "window": min(8, dataset.n_features),
                                          "stride": 1, "top_n": 20}}
    clients, per_client = (8, 200) if quick else (20, 500)
    if dataset.image_shape is not None:
        streams = benign_streams(labeller, X_own, dataset.image_shape, clients, per_client, seed=seed)
    else:
        streams = benign_rows(labeller, X_own, clients, per_client, seed=seed)
    thresholds = asyncio.run(calibrate(streams, config))
    return {name: {**config[name], **thresholds[name]} for name in config}


def _context(config: BenchConfig, cell: Cell, defence: Defence, shared: Callable) -> Context:
    """The cell's data and models; ``shared`` makes each model of the cell's group once."""
    dataset, sensitive = load_dataset(cell.dataset, config.sensitive)
    split = datasets.split(dataset, cell.seed)
    X_train = dataset.X[split.train]
    recipe = target_recipe(config, dataset, cell.model, len(split.train))
    model = _target(config, cell, defence, shared)
    held_out = split.held_out
    evaluator_model = shared(("evaluator",), lambda: models.train_target(
        "mlp", dataset.X[held_out], dataset.y[held_out], dataset.n_classes, seed=cell.seed + 1000,
        epochs=models.Recipe("mlp").sized(len(held_out)).epochs))
    context = Context(dataset, split, cell.model, recipe.hidden, TrainingConfig(**config.training), defence,
                      cell.seed, config.quick, model, _labeller(model), _labeller(evaluator_model), sensitive,
                      activation=recipe.activation, shared=shared)
    if defence.monitoring:
        context.detectors = shared(("detectors",), lambda: calibrated_detectors(
            dataset, X_train, context.labels_of, cell.seed, config.quick))
    return context


def _target(config: BenchConfig, cell: Cell, defence: Defence, shared: Callable) -> torch.nn.Module:
    dataset, _ = load_dataset(cell.dataset, config.sensitive)
    split = datasets.split(dataset, cell.seed)
    recipe = target_recipe(config, dataset, cell.model, len(split.train))
    return shared(("target", *_training_key(defence)), lambda: _train_target(
        dataset, cell.model, recipe, split, defence, cell.seed, config))


def _training_key(defence: Defence) -> tuple:
    """What of a defence changes how its target trains: the DP epsilon (None without DP) and public
    pretraining."""
    return (defence.dp_epsilon, "public") if defence.dp_public else (defence.dp_epsilon,)


def target_recipe(config: BenchConfig, dataset: datasets.Dataset, kind: str, n_train: int) -> models.Recipe:
    """The target's architecture and training: the zoo's recipe for the data set and its kind (images or
    a table), with the user's choices (``--hidden``, ``--activation``, ``--lr``, ``--epochs``) over it;
    without ``--epochs``, sized to the data (``models.MIN_STEPS``)."""
    chosen = {"hidden": config.hidden, "activation": config.activation, "lr": config.lr, "epochs": config.epochs}
    recipe = replace(models.recipe(dataset.name, kind, images=dataset.image_shape is not None),
                     **{k: v for k, v in chosen.items() if v is not None})
    return recipe if config.epochs else recipe.sized(n_train)


@cache
def load_dataset(name: str, sensitive: str | None = None) -> tuple[datasets.Dataset, tuple[int, np.ndarray] | None]:
    """The records of dataset ``name`` and its sensitive attribute (column, values), if it has one
    (breast cancer: the coded "worst concave points" level; a user's file: ``sensitive``, or the one
    its NPZ names)."""
    if name == "breast_cancer" and sensitive is None:
        table = sensitive_breast_cancer()
        return table.dataset, (table.attribute, table.values)
    dataset = datasets.load(name, sensitive)
    return dataset, None if dataset.sensitive is None else (dataset.sensitive, dataset.sensitive_values)


@cache
def data_digest(name: str, sensitive: str | None = None) -> str:
    """The content hash of data set ``name`` as loaded (records, labels, image shape, sensitive attribute)."""
    dataset, attribute = load_dataset(name, sensitive)
    return digest(dataset.X, dataset.y, dataset.image_shape, attribute)


def _labeller(model: torch.nn.Module):
    return lambda X: models.predict_proba(model, X).argmax(axis=1)


def _train_target(dataset: datasets.Dataset, kind: str, recipe: models.Recipe, split: datasets.Split,
                  defence: Defence, seed: int, config: BenchConfig) -> torch.nn.Module:
    """The target of one cell, trained on the split's training part. Without DP: the recipe, or the first
    of ``models.fit``'s few variations of its learning rate and epochs (those the user did not set) that
    fits the training set to the floor (``models.train_accuracy_floor``); refused (``models.Underfit``) if
    none does. DP-SGD trains with its own recipe (``guard.dp.DP_RECIPE``) sized to the data, never the
    non-private one (after pretraining on the auxiliary part for ``dp_public``), and is not held to the
    floor (its lower fit is its privacy cost, reported as utility)."""
    X, y = dataset.X[split.train], dataset.y[split.train]
    if defence.dp_epsilon is None:
        fixed = frozenset(name for name in ("lr", "epochs") if getattr(config, name) is not None)
        floor = models.train_accuracy_floor(X, y, config.min_train_accuracy, dataset.image_shape is not None)
        return models.fit(lambda: _initial_model(dataset, kind, recipe, seed, config), recipe, X, y, seed, floor,
                          f"the {kind} target on {dataset.name} (seed {seed})", fixed)
    from guard.dp import train_private

    private, _ = train_private(_initial_model(dataset, kind, recipe, seed, config), (X, y), seed=seed,
                               **_dp_options(dataset, split, defence))
    return private.eval()


def _dp_options(dataset: datasets.Dataset, split: datasets.Split, defence: Defence) -> dict[str, Any]:
    """``train_private``'s options for a DP defence: its epsilon, ``DP_RECIPE`` sized to the training part,
    and for ``dp_public`` the auxiliary part as public data."""
    from guard.dp import DP_RECIPE

    public = (dataset.X[split.aux], dataset.y[split.aux]) if defence.dp_public else None
    return {"target_epsilon": defence.dp_epsilon, "public_data": public, **DP_RECIPE.options(len(split.train))}


def _initial_model(dataset: datasets.Dataset, kind: str, recipe: models.Recipe, seed: int,
                   config: BenchConfig) -> torch.nn.Module:
    torch.manual_seed(seed)
    return (_user_model(config.model, dataset) if kind == "user"
            else recipe.build(dataset.n_features, dataset.n_classes))


def _dp_audit(config: BenchConfig, cell: Cell, defence: Defence, shared: Callable) -> dict[str, Any] | None:
    """The one-run canary audit (``guard.dp.audit.audit``, Steinke, Nasr & Jagielski 2023) of the cell's DP-SGD
    training: one more run from the target's initial weights with its settings and white-box gradient canaries
    (the bench has the weights). None without DP, and in ``--quick`` (a smoke test: the membership attacks'
    black-box bound still shows)."""
    if defence.dp_epsilon is None or config.quick:
        return None
    from guard.dp.audit import audit

    dataset, _ = load_dataset(cell.dataset, config.sensitive)
    split = datasets.split(dataset, cell.seed)
    recipe = target_recipe(config, dataset, cell.model, len(split.train))
    X, y = dataset.X[split.train], dataset.y[split.train]
    return shared(("dp-audit", *_training_key(defence)), lambda: audit(
        _initial_model(dataset, cell.model, recipe, cell.seed, config), (X, y), kind="gradient", seed=cell.seed,
        **_dp_options(dataset, split, defence)).as_dict())


def _user_model(factory: str, dataset: datasets.Dataset) -> torch.nn.Module:
    """``module:function`` called with ``(n_features, n_classes)``."""
    from guard.models import model_from
    from guard.references import import_function

    return model_from(import_function(factory), dataset.n_features, dataset.n_classes)


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


def _attack(spec: AttackSpec, context: Context, config: BenchConfig, attacker: str, verify: bool = False
            ) -> dict[str, Any]:
    """One attack on one fresh guarded server, through one key or as the key-rotating Sybil attacker; with
    ``verify``, its copy tested against the watermark records the server kept (``benchmarks.ownership.verifier``)."""
    app = guarded_app(context, config.max_body_bytes)
    shape = (context.dataset.n_classes, context.dataset.n_features, config.live)
    check = ownership.verifier(context, app) if verify else None
    if attacker == ONE_KEY:
        with http_target(app, *shape, [ATTACKER_KEYS[0]], config.max_body_bytes) as target:
            return attempt(spec, context, target, check)
    with rotating_target(app, *shape, list(ATTACKER_KEYS), SYBIL_KEYS, config.max_body_bytes) as target:
        outcome = attempt(spec, context, target, check)
    cost = target.cost
    return {**outcome, "attacker_cost": {**asdict(cost), "hours": cost.hours(KEY_RATE_PER_HOUR, SYBIL_KEYS)}}


def attempt(spec: AttackSpec, context: Context, target: HTTPTarget | KeyRotatingTarget,
            verify: Callable[[Any], dict[str, float]] | None = None) -> dict[str, Any]:
    """Run one attack against ``target``: its measures, or why it could not finish ("stopped" when
    the endpoint throttled, degraded or blocked it; "not-applicable" when it lacks what it needs or
    more queries than its budget); with ``verify``, also ``ownership``: what ``verify`` measures of the
    attack's copy."""
    started = time.perf_counter()
    try:
        result = spec.run(target, context)
        status, reason, metrics, artefacts = "ok", "", result.metrics, result.artefacts
    except (OutputUnavailable, QueryBudgetExceeded, TargetBlocked, TargetThrottled) as error:
        stopped = any(value is not None for value in target.events.values())
        status, reason, metrics, artefacts = "stopped" if stopped else "not-applicable", str(error), {}, {}
    events = target.events
    verified = verify(artefacts["model"]) if verify is not None and "model" in artefacts else {}
    return {"status": status, "reason": reason, "metrics": {k: float(v) for k, v in metrics.items()},
            "ownership": {k: float(v) for k, v in verified.items()},
            "queries": target.queries, "flagged_at": events["degraded_at"] if events["degraded_at"] is not None
            else events["throttled_at"], "blocked_at": events["blocked_at"], "attacker_cost": None,
            "wall_time_s": time.perf_counter() - started, "curves": _curves(artefacts),
            "images": _images(artefacts), "samples": _samples(artefacts)}


def _samples(artefacts: dict[str, Any]) -> dict[str, list[float]]:
    """Per-item values the verdict's interval resamples (``benchmarks.verdicts``): e.g. each
    reconstruction's advantage over the no-model reference and its victim."""
    return {name: np.asarray(values, dtype=float).tolist() for name, values in artefacts.get("samples", {}).items()}


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
        "attacker_cost": _attacker_cost(results),
        "utility": {name: report.summarise([r["utility"].get(name) for r in results])
                    for name in ("test_accuracy", "label_change_rate", "benign_flagged", "target_train_accuracy",
                                 "target_held_out_accuracy")},
        "wall_time_s": report.summarise([r["wall_time_s"] for r in results]),
        "curves": first["curves"], "images": first["images"],
        "samples": [r.get("samples", {}) for r in done],  # per seed, as "metrics" values are
        "dp_audit": _audit_summary([r.get("dp_audit") for r in results]),
    }


def _attacker_cost(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The key-rotating attacker's cost over seeds (None for other attackers): keys used and burned, rows
    spent and lost, hours at ``KEY_RATE_PER_HOUR`` per key with ``SYBIL_KEYS`` keys at once, and in how many
    seeds it finished."""
    costs = [r["attacker_cost"] for r in results if r["attacker_cost"] is not None]
    if not costs:
        return None
    summary = {name: report.summarise([c[name] for c in costs]) for name in costs[0]}
    return {**summary, "finished": sum(r["status"] == "ok" for r in results), "keys": KEY_POOL,
            "parallel": SYBIL_KEYS, "per_key_per_hour": KEY_RATE_PER_HOUR}


def _audit_summary(audits: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The one-run canary audits of a DP row over its seeds: the lower bound and the accountant's epsilon (both at
    the audit's delta) summarised, and the audit's confidence, delta and method; None when not audited."""
    done = [a for a in audits if a is not None]
    if not done:
        return None
    return {"epsilon_lower_bound": report.summarise([a["epsilon_lower_bound"] for a in done]),
            "epsilon": report.summarise([a["epsilon"] for a in done]),
            **{name: done[0][name] for name in ("confidence", "delta", "method", "canaries")}}
