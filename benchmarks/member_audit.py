"""Member audit of a user's trained model (``guard audit --members --non-members``): how much does *this*
model leak about *these* records? The question ML Privacy Meter answers, by the attacks of
``attacks.membership``.

The user gives the records the model was trained on (members), records it never saw (non-members) and,
ideally, population records from the same distribution that are neither. The target is the model: a
live endpoint (described as ``guard audit`` describes one) or a local torch model (``module:factory``
with its state dict). Reference models are trained as the user trained the target (the factory, with the
given epochs, learning rate and batch size; without a factory, the bench's MLP), on random halves of
the candidates and the population, every record IN for half of them; the online and offline attacks
share them (offline: each record's OUT models). Attacks: the loss threshold (Yeom et al. 2018, no
reference model), LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh et al. 2024), online and offline.

Without a population, the references train on random halves of the candidates alone, RMIA compares
each candidate with the other candidates (its z samples), and the offline attacks still use each
record's OUT models. Reported per attack: AUC, TPR at 1% and 0.1% FPR with 95% Clopper-Pearson
intervals over the members, beside the no-model reference (guessing: TPR = FPR); per record
(``record_scores.csv``), every attack's score and the FPR at which the strongest attack flags it.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import AttackResult
from attacks.ensemble import Architecture, TrainingConfig, random_halves, train_ensemble
from attacks.membership import RMIA, LiRA, ThresholdAttack
from attacks.scoring import LOW_FPRS, clopper_pearson
from attacks.targets import CallableTarget, Target
from benchmarks.audit import DEFAULT_BATCH, Endpoint, check_host, route_from_options
from guard import data, models
from guard.policy import RoutePolicy
from guard.references import import_function

ATTACKS = ("threshold", "lira-online", "lira-offline", "rmia-online", "rmia-offline")
SOURCES = ("member", "non-member", "population")


@dataclass(frozen=True)
class Records:
    """The audit's records as one data set scaled jointly (``dataset``; ``dataset.raw`` maps back to
    the files' values), and which file each row came from (``source``) and its row there (``row``)."""

    dataset: data.Dataset
    source: np.ndarray
    row: np.ndarray

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.source == name
        return self.dataset.X[chosen].astype(np.float64), self.dataset.y[chosen]


def load_records(members: str | Path, non_members: str | Path, population: str | Path | None = None) -> Records:
    """The three files (CSV with a header and the label last, or NPZ with ``X`` and ``y``), read in
    their own values and labels and scaled together (``guard.data.from_arrays``)."""
    features, labels, source, rows = [], [], [], []
    for name, path in zip(SOURCES, (members, non_members, population)):
        if path is None:
            continue
        loaded = data.load(str(path))
        features.append(loaded.raw(loaded.X).reshape(len(loaded.y), *(loaded.image_shape or (-1,))))
        labels.append(np.asarray(loaded.classes, dtype=object)[loaded.y])
        source += [name] * len(loaded.y)
        rows.append(np.arange(len(loaded.y)))
    widths = {f.shape[1:] for f in features}
    if len(widths) != 1:
        raise ValueError(f"the files' records differ in shape: {sorted(widths)}")
    y = np.concatenate(labels)
    y = y.astype(np.float64) if all(isinstance(v, (int, float)) for v in y) else y.astype(str)
    dataset = data.from_arrays("member-audit", np.concatenate(features), y)
    return Records(dataset, np.array(source), np.concatenate(rows))


class ModelReferences:
    """Reference models built by the user's factory and trained with the user's recipe, one per row of
    ``masks`` over the pool: what ``LiRA`` and ``RMIA`` read of an ``attacks.ensemble.Ensemble``
    (``masks``, ``len``, ``predict_proba``). ``encode`` maps the attack's [0, 1] features to the
    model's."""

    def __init__(self, factory: Callable[[], torch.nn.Module], X: np.ndarray, y: np.ndarray, masks: np.ndarray,
                 recipe: TrainingConfig, encode: Callable[[np.ndarray], np.ndarray], seed: int):
        self.masks, self.encode = masks, encode
        self.models = []
        for index, mask in enumerate(masks):
            torch.manual_seed(seed + index)
            self.models.append(models.train(factory(), encode(X[mask]), y[mask], epochs=recipe.epochs, lr=recipe.lr,
                                            batch_size=recipe.batch_size, weight_decay=recipe.weight_decay,
                                            seed=seed + index))

    def __len__(self) -> int:
        return len(self.models)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.stack([models.predict_proba(model, self.encode(X)) for model in self.models])


@dataclass
class MemberAudit:
    """What the audit measured: per attack its ``AttackResult`` (or why it did not run), the
    candidates' membership, and where each candidate came from."""

    results: dict[str, AttackResult | str]
    is_member: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    references: int
    population: int

    def measures(self) -> dict[str, dict[str, Any]]:
        """Per attack: AUC, TPR at 1% and 0.1% FPR with 95% intervals over the members, the no-model
        reference (TPR = FPR), or the reason it did not run."""
        members = int(self.is_member.sum())
        table: dict[str, dict[str, Any]] = {}
        for name, result in self.results.items():
            if isinstance(result, str):
                table[name] = {"status": "not-applicable", "reason": result}
                continue
            entry: dict[str, Any] = {"status": "ok", "auc": result.metrics["auc"], "queries": result.queries}
            for label, rate in LOW_FPRS.items():
                tpr = result.metrics[f"tpr_at_{label}_fpr"]
                entry[f"tpr_at_{label}_fpr"] = {"value": tpr, "interval": clopper_pearson(tpr * members, members),
                                                "no_model_reference": rate}
            if "a" in result.metrics:
                entry["a"] = result.metrics["a"]
            table[name] = entry
        return table

    def strongest(self) -> str | None:
        """The attack with the highest TPR at 1% FPR (ties: the higher AUC)."""
        ran = {n: r for n, r in self.results.items() if not isinstance(r, str)}
        return max(ran, key=lambda n: (ran[n].metrics["tpr_at_1pct_fpr"], ran[n].metrics["auc"]), default=None)

    def exposure(self, attack: str) -> np.ndarray:
        """Per candidate, the false-positive rate at which ``attack`` calls it a member: the share of
        non-members scoring at least as high (lower = more exposed)."""
        scores = self.results[attack].artefacts["scores"]
        negatives = np.sort(scores[~self.is_member])
        return (len(negatives) - np.searchsorted(negatives, scores, side="left")) / len(negatives)


def audit_members(target: Target, records: Records, *, n_references: int = 8,
                  architecture: Architecture = Architecture(), training: TrainingConfig = TrainingConfig(),
                  factory: Callable[[], torch.nn.Module] | None = None,
                  encode: Callable[[np.ndarray], np.ndarray] = lambda X: X, seed: int = 0,
                  echo: Callable[[str], None] = lambda line: None) -> MemberAudit:
    """Run ``ATTACKS`` against ``target`` on the members and non-members of ``records``, with
    ``n_references`` reference models (``factory`` and ``training``, on features passed through
    ``encode``; without a factory, ``architecture`` as one vectorised ensemble)."""
    X_m, y_m = records.part("member")
    X_n, y_n = records.part("non-member")
    order = np.random.default_rng(seed).permutation(len(y_m) + len(y_n))
    X, y = np.concatenate([X_m, X_n])[order], np.concatenate([y_m, y_n])[order]
    is_member = (np.arange(len(order)) < len(y_m))[order]
    rows = np.concatenate([records.row[records.source == "member"], records.row[records.source == "non-member"]])[order]
    population = records.part("population") if (records.source == "population").any() else None
    X_pool = X if population is None else np.concatenate([X, population[0]])
    y_pool = y if population is None else np.concatenate([y, population[1]])
    masks = random_halves(len(y_pool), n_references, seed)
    echo(f"training {n_references} reference models on random halves of {len(y_pool)} records")
    if factory is None:
        references = train_ensemble(X_pool, y_pool, masks, records.dataset.n_classes, architecture=architecture,
                                    config=training, seed=seed)
    else:
        references = ModelReferences(factory, X_pool, y_pool, masks, training, encode, seed)
    z = {"population": population} if population is not None else {"z_index": np.arange(len(y))}
    runs: dict[str, Callable[[], AttackResult]] = {
        "threshold": lambda: ThresholdAttack("loss").run(target, X, y, is_member=is_member),
        "lira-online": lambda: LiRA(n_references, seed=seed).run(target, X, y, population=population,
                                                                  is_member=is_member, references=references),
        "lira-offline": lambda: LiRA(n_references, offline=True, seed=seed).run(
            target, X, y, population=population, is_member=is_member, references=references),
        "rmia-online": lambda: RMIA(n_references, seed=seed).run(target, X, y, is_member=is_member,
                                                                 references=references, **z),
        "rmia-offline": lambda: RMIA(n_references, offline=True, seed=seed).run(
            target, X, y, is_member=is_member, references=references, **z),
    }
    results: dict[str, AttackResult | str] = {}
    for name, run in runs.items():
        if not target.returns_probabilities and name != "threshold":
            results[name] = "needs probabilities; the model answers labels only"
            continue
        results[name] = run()
        echo(f"{name}: AUC {results[name].metrics['auc']:.3f}, TPR at 1% FPR "
             f"{results[name].metrics['tpr_at_1pct_fpr']:.3f} (no-model reference 0.010)")
    return MemberAudit(results, is_member, rows, y, n_references, 0 if population is None else len(population[1]))


def model_factory(reference: str, n_features: int, n_classes: int) -> Callable[[], torch.nn.Module]:
    """Fresh models from the user's ``module:function(n_features, n_classes)`` (one that returns
    logits, as the bench's ``--model``), checked to be torch modules."""
    build = import_function(reference)

    def fresh() -> torch.nn.Module:
        model = build(n_features, n_classes)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{reference} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return fresh


def local_target(fresh: Callable[[], torch.nn.Module], weights: str | Path, n_classes: int,
                 encode: Callable[[np.ndarray], np.ndarray]) -> Target:
    """The user's model: a fresh model with the state dict at ``weights``, asked on ``encode``d features."""
    model = fresh()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return CallableTarget(lambda X: models.predict_proba(model, encode(X)), n_classes)


def member_audit(members: str | Path, non_members: str | Path, out: Path, *, population: str | Path | None = None,
                 url: str | None = None, model: str | None = None, weights: str | Path | None = None,
                 route: RoutePolicy | None = None, example: Any = None, features_path: str | None = None,
                 probabilities_path: str | None = None, fields: tuple[str, ...] | None = None,
                 labels: tuple[str, ...] | None = None, batch_size: int | None = None, scale: bool = False,
                 api_keys: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = (), n_references: int = 8,
                 training: TrainingConfig = TrainingConfig(), seed: int = 0, client: Any = None,
                 echo: Callable[[str], None] = lambda line: None) -> dict[str, Path]:
    """Audit the model at ``url`` (or the local ``model`` with ``weights``) on the member and non-member
    files and write ``results.json``, ``report.md`` and ``record_scores.csv`` into ``out``. ``model``
    without ``weights`` beside a ``url``: the architecture the references are built with. ``scale``:
    the model takes features scaled to [0, 1] (jointly over the files), not as in the files."""
    if (url is None) == (weights is None):
        raise ValueError("name one model to audit: --url, or --model with --weights")
    if weights is not None and model is None:
        raise ValueError("--weights needs --model module:factory (the architecture the state dict fits)")
    records = load_records(members, non_members, population)
    dataset = records.dataset
    encode = (lambda X: np.asarray(X, dtype=np.float64)) if scale else dataset.raw
    factory = None if model is None else model_factory(model, dataset.n_features, dataset.n_classes)
    if url is None:
        target = local_target(factory, weights, dataset.n_classes, encode)
    else:
        if client is None:
            check_host(url, allowed_hosts)
        route = route or route_from_options(features_path, fields, probabilities_path, labels)
        endpoint = Endpoint(url, route, example, batch_size or DEFAULT_BATCH, scale)
        endpoint.check(dataset.n_features)
        target = endpoint.target(dataset, client, api_keys=api_keys)
    counts = {name: int((records.source == name).sum()) for name in SOURCES}
    echo(f"auditing {url or model} on {counts['member']} members and {counts['non-member']} non-members; "
         + (f"{counts['population']} population records" if counts["population"] else
            "no population: the references train on halves of the candidates, RMIA compares candidates "
            "with each other"))
    try:
        audit = audit_members(target, records, n_references=n_references, training=training, factory=factory,
                              encode=encode, seed=seed, echo=echo)
    finally:
        if hasattr(target, "close"):
            target.close()
    return write(audit, out, {"command": "guard audit --members", "url": url, "model": model,
                              "members": str(members), "non_members": str(non_members),
                              "population": None if population is None else str(population),
                              "references": n_references, "training": training.__dict__, "seed": seed,
                              "scaled": scale, "counts": counts})


def write(audit: MemberAudit, out: Path, config: dict[str, Any]) -> dict[str, Path]:
    """``results.json`` (configuration and measures), ``report.md`` (the table) and
    ``record_scores.csv`` (one row per candidate, most exposed first)."""
    out.mkdir(parents=True, exist_ok=True)
    measures = audit.measures()
    strongest = audit.strongest()
    paths = {"json": out / "results.json", "markdown": out / "report.md", "records": out / "record_scores.csv"}
    paths["json"].write_text(json.dumps({"config": config, "strongest": strongest, "measures": measures},
                                        indent=2, default=float))
    ran = [name for name, result in audit.results.items() if not isinstance(result, str)]
    exposure = audit.exposure(strongest)
    with paths["records"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "row", "label", f"exposure_fpr ({strongest})", *(f"score_{n}" for n in ran)])
        for i in np.argsort(exposure, kind="stable"):
            writer.writerow(["members" if audit.is_member[i] else "non-members", int(audit.rows[i]), audit.labels[i],
                             f"{exposure[i]:.4g}", *(f"{audit.results[n].artefacts['scores'][i]:.6g}" for n in ran)])
    paths["markdown"].write_text(markdown(audit, measures, strongest, config))
    return paths


def markdown(audit: MemberAudit, measures: dict[str, dict[str, Any]], strongest: str | None,
             config: dict[str, Any]) -> str:
    counts = config["counts"]
    lines = ["# Member audit", "",
             f"Model: {config['url'] or config['model']}. Members: {counts['member']}, non-members: "
             f"{counts['non-member']}, population: {counts['population']}; {audit.references} reference models.", "",
             "Threat model: the attacker holds the candidate records and population data from the same "
             "distribution, queries the model once per record, and trains reference models as the model was "
             "trained. No-model reference: guessing, TPR = FPR.", "",
             "| attack | AUC | TPR at 1% FPR (95% interval) | TPR at 0.1% FPR (95% interval) |",
             "| --- | --- | --- | --- |"]
    for name, entry in measures.items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | not applicable: {entry['reason']} | | |")
            continue
        cells = [f"{entry[f'tpr_at_{label}_fpr']['value']:.3f} ({entry[f'tpr_at_{label}_fpr']['interval'][0]:.3f}"
                 f"-{entry[f'tpr_at_{label}_fpr']['interval'][1]:.3f}; no model {rate:g})"
                 for label, rate in LOW_FPRS.items()]
        lines.append(f"| {name} | {entry['auc']:.3f} | {cells[0]} | {cells[1]} |")
    for rate in LOW_FPRS.values():
        if counts["non-member"] * rate < 1:
            lines += ["", f"With {counts['non-member']} non-members, {rate:.1%} FPR lies between two of them: the TPR "
                      f"there is interpolated on the ROC curve; give at least {round(1 / rate)} non-members for a "
                      "measured value."]
    lines += ["", f"Strongest attack: {strongest}. `record_scores.csv` lists every record, most exposed first: "
              "`exposure_fpr` is the false-positive rate at which that attack calls the record a member."]
    return "\n".join(lines) + "\n"
