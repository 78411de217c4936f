"""The ownership family: can the owner prove, after the fact, that a copy was made from its answers?

Threat model: nothing stopped the copier (every extraction attack of the suite succeeds against every
output defence); the API answers with the watermark (DAWN: Szyller, Atli, Marchal, Asokan, "DAWN:
Dynamic Adversarial Watermarking of Neural Networks", ACM MM 2021) alone or combined with the other
output defences, and keeps the watermark records. The owner tests each extraction attack's copy with
``attacks.ownership.OwnershipTest`` at ``alpha = 1e-6`` on at most 2,000 records. No-model reference:
54 independent models (three architectures, on 80% subsets of the owner's training data and of the
attacker's own labelled data, one batched ensemble each) tested against the same records must not be
accused. Adaptive attackers (Kerckhoffs: they know the scheme and r) on an augmented Copycat of 4,000
queries: one that spreads its queries over 20 API keys, one that drops the answers its own out-of-fold
ensemble disputes, one that distils its copy into a fresh model on fresh inputs, one that fine-tunes
its copy on its own labelled data.

In ``guard bench`` the family's rows come from the extraction attacks of the cells whose defence
watermarks (``benchmarks.cells``); ``python -m benchmarks.ownership`` runs the same at other rates
(``--rates``) and prints the family's table.
"""
from __future__ import annotations

import argparse
import asyncio
import copy as copy_module
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.ensemble import Architecture, TrainingConfig, train_ensemble
from attacks.extraction import labeller, train_copy
from attacks.ownership import (
    ALPHA,
    OwnershipTest,
    Records,
    Verification,
    consistent_answers,
    queries_needed,
)
from benchmarks.endpoint import ISSUED_KEYS, guarded_app, http_target
from benchmarks.scenarios import WATERMARK_RATE, AttackSpec, Context, Defence, watermark_defences
from guard.middleware import GuardMiddleware
from guard.models import train

AUGMENTED_QUERIES = 4000
"""The augmented Copycat's queries: the attacker's pool and noisy variants of it (the suite's
attackers spend a few hundred, which carry about one watermark each at r = 0.005)."""
FINE_TUNING_EPOCHS = 30
"""Epochs of the fine-tuning attacker: Adam at 1e-3 on the attacker's own labelled data, from the copy
(fine-tuning as watermark removal, as Adi et al., USENIX Security 2018, test it, applied to a stolen copy)."""
INDEPENDENT_ARCHITECTURES = (Architecture("softmax"), Architecture("mlp", 64), Architecture("mlp", 256, "tanh"))
INDEPENDENT_PER_ENSEMBLE = 9
"""Models per (training data, architecture): 2 x 3 x 9 = 54 independent models per target."""
PREFIX = "ownership: "
"""Every row of the family names its copy after this prefix (``ownership: copycat``)."""

OWNERSHIP = AttackSpec("ownership", "ownership", "verified", run=lambda target, context: None,
                       chance=lambda context: 0.0)
"""The family's report rows: ``verified`` (1 when the copy is accused at alpha) is their measure; an
independent model's is 0 (``false_accusations`` counts those that were not)."""


def rate_of(defence: Defence) -> float | None:
    """The watermark rate of ``defence``, or None if it does not watermark."""
    from guard.outputs import read_spec

    rates = [read_spec(spec)[1][0] for spec in defence.output if read_spec(spec)[0] == "watermark"]
    return float(rates[0]) if rates else None


def kept_records(app) -> Records | None:
    """The watermark records the (built) app's guard kept: the owner's export (None if it kept none:
    a copier of a few queries may draw neither a watermark nor a control)."""
    layer = app.middleware_stack
    while not isinstance(layer, GuardMiddleware):
        layer = layer.app
    kept = asyncio.run(layer.monitoring.watermarks.export())
    return Records.from_lines([record.encode() for record in kept]) if kept else None


class Independent:
    """The no-model reference: independent models whose labels are tested against a copy's records."""

    def __init__(self, context: Context, seed: int) -> None:
        k = context.dataset.n_classes
        self.ensembles = []
        rng = np.random.default_rng(seed)
        for part in ("train", "aux"):  # the owner's data, the attacker's own labelled data
            X, y = context.part(part)
            for index, architecture in enumerate(INDEPENDENT_ARCHITECTURES):
                masks = rng.random((INDEPENDENT_PER_ENSEMBLE, len(X))) < 0.8
                masks[:, rng.integers(len(X))] = True
                self.ensembles.append(train_ensemble(X, y, masks, k, architecture=architecture,
                                                     config=TrainingConfig(epochs=60), seed=seed + index))

    def __len__(self) -> int:
        return sum(len(ensemble) for ensemble in self.ensembles)

    def judge(self, test: OwnershipTest, records: Records) -> list[Verification]:
        chosen = test.chosen(records)
        labels = np.concatenate([ensemble.logits(chosen.features).argmax(dim=-1).numpy()
                                 for ensemble in self.ensembles])
        return [test.judge(row == chosen.labels, chosen) for row in labels]


def independent_models(context: Context) -> Independent:
    """The target's independent models, made once for every defence of it (``Context.reuse``)."""
    return context.reuse(("independent", len(INDEPENDENT_ARCHITECTURES), INDEPENDENT_PER_ENSEMBLE),
                         lambda: Independent(context, context.seed))


def verified(records: Records | None, predict: Callable[[np.ndarray], np.ndarray], independent: Independent,
             rate: float, test: OwnershipTest | None = None) -> dict[str, float]:
    """The family's measures of one copy (``predict``: its labels) against ``records``: the pooled
    test's counts, p-value and verdict, the clients accused one by one (at alpha over their number),
    the independent models accused with the same records, and the queries a copier must make before a
    claim at alpha is possible at ``rate`` (``queries_needed``, at the copy's own measured rate of
    agreeing with control labels, or the independent models' where it saw none). Without records
    nothing is tested: no copy and no independent model is accused."""
    test = test or OwnershipTest()
    if records is None:
        return {"verified": 0.0, "p_value": 1.0, "watermarks": 0, "reproduced": 0, "controls": 0, "agreed": 0,
                "verification_queries": 0, "clients": 0, "clients_accused": 0, "false_accusations": 0,
                "independent_models": len(independent), "independent_min_p": 1.0, "null_agreement": 0.0,
                "queries_needed": queries_needed(rate, 0.0, test.alpha)}
    verification = test.run(predict, records)
    others = independent.judge(test, records)
    e = verification.overall
    null = (e.agreed / e.controls if e.controls else
            sum(v.overall.agreed for v in others) / max(sum(v.overall.controls for v in others), 1))
    return {"verified": float(e.accused), "p_value": e.p_value, "watermarks": e.watermarks,
            "reproduced": e.reproduced, "controls": e.controls, "agreed": e.agreed,
            "verification_queries": verification.queries, "clients": len(verification.clients),
            "clients_accused": sum(c.accused for c in verification.clients),
            "false_accusations": sum(v.overall.accused for v in others), "independent_models": len(others),
            "independent_min_p": min(v.overall.p_value for v in others), "null_agreement": null,
            "queries_needed": queries_needed(rate, null, test.alpha)}


def verifier(context: Context, app) -> Callable[[Any], dict[str, float]] | None:
    """What ``benchmarks.cells.attempt`` calls with an extraction copy served by ``app``: its
    verification against the records ``app`` kept; None where the context's defence does not watermark."""
    rate = rate_of(context.defence)
    if rate is None:
        return None
    return lambda copy: verified(kept_records(app), labeller(copy), independent_models(context), rate)


def row_outcome(outcome: dict[str, Any], metrics: dict[str, float], adaptive: bool = False) -> dict[str, Any]:
    """A family row's per-seed outcome: the attack's (status, queries, events, time) with the
    ownership measures in place of its own."""
    return {**outcome, "metrics": metrics, "curves": {}, "images": {}, "chance": 0.0, "adaptive": adaptive}


def augmented_queries(context: Context, n: int, seed: int) -> np.ndarray:
    """The attacker's pool, then noisy variants of it (Gaussian, sd 0.1, clipped to [0, 1]), ``n`` rows."""
    pool, _ = context.part("aux")
    rng = np.random.default_rng(seed)
    extra = pool[rng.integers(len(pool), size=max(n - len(pool), 0))]
    return np.concatenate([pool, np.clip(extra + rng.normal(0, 0.1, extra.shape), 0, 1)])[:n]


def adaptive_outcomes(context: Context, max_body_bytes: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The augmented Copycat, then each adaptive attacker, against fresh watermarked servers:
    (copy name, outcome) pairs, the outcome's metrics those of ``verified`` and ``agreement_test``."""
    rate, k = rate_of(context.defence), context.dataset.n_classes
    hidden = context.hidden if context.model_kind == "mlp" else None
    independent = independent_models(context)
    X = augmented_queries(context, AUGMENTED_QUERIES, context.seed)
    X_test, _ = context.part("test")

    def stolen(keys: list[str]) -> tuple[Records, np.ndarray]:
        app = guarded_app(context, max_body_bytes)
        with http_target(app, k, context.dataset.n_features, False, keys, max_body_bytes) as target:
            target.batch_size = min(target.batch_size, 100)  # 40 requests, dealt over the keys
            answers = target.predict(X)
        return kept_records(app), answers

    def copy(inputs: np.ndarray, labels: np.ndarray) -> torch.nn.Module:
        return train_copy(inputs, np.eye(k)[labels], hidden, epochs=100, seed=context.seed)

    def outcome(records: Records, predict: Callable[[np.ndarray], np.ndarray], started: float,
                adaptive: bool) -> dict[str, Any]:
        metrics = {**verified(records, predict, independent, rate),
                   "agreement_test": float((predict(X_test) == context.labels_of(X_test)).mean())}
        return row_outcome({"status": "ok", "reason": "", "queries": len(X), "flagged_at": None, "blocked_at": None,
                            "attacker_cost": None, "wall_time_s": time.perf_counter() - started}, metrics, adaptive)

    started = time.perf_counter()
    records, answers = stolen([ISSUED_KEYS[1]])
    plain = copy(X, answers)
    yield "augmented copycat", outcome(records, labeller(plain), started, False)
    started = time.perf_counter()
    sybil_records, sybil_answers = stolen(list(ISSUED_KEYS[1:]))
    yield f"augmented copycat over {len(ISSUED_KEYS) - 1} keys", outcome(
        sybil_records, labeller(copy(X, sybil_answers)), started, True)
    started = time.perf_counter()
    keep = consistent_answers(X, answers, k, context.architecture, TrainingConfig(epochs=60), seed=context.seed)
    yield "augmented copycat dropping the answers its ensemble disputes", outcome(
        records, labeller(copy(X[keep], answers[keep])), started, True)
    started = time.perf_counter()
    fresh = augmented_queries(context, AUGMENTED_QUERIES, context.seed + 1)
    yield "augmented copycat distilled on fresh inputs", outcome(
        records, labeller(copy(fresh, labeller(plain)(fresh))), started, True)
    started = time.perf_counter()
    own_X, own_y = context.part("aux")
    tuned = train(copy_module.deepcopy(plain), own_X, own_y, epochs=FINE_TUNING_EPOCHS, lr=1e-3, seed=context.seed)
    yield "augmented copycat fine-tuned on its own labelled data", outcome(records, labeller(tuned), started, True)


def section(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The report's ownership table: one line per family row (a copy verified against its records)."""
    lines = [["dataset", "model", "defence", "copy", "queries", "copy agreement", "watermarks seen", "reproduced",
              "controls agreed", "p-value", "verified", "clients accused", "verification queries",
              "false accusations", "queries needed", "accuracy cost", "labels changed"]]
    for r in rows:
        if r["family"] != "ownership" or r["status"] != "ok":
            continue
        m = {name: measure["values"] for name, measure in r["metrics"].items()}
        each = functools.partial(_each, m)
        lines.append([r["dataset"], r["model"], r["defence"], r["attack"].removeprefix(PREFIX),
                      ", ".join(f"{q:.0f}" for q in r["queries"]["values"]), each("agreement_test", "{:.3f}"),
                      each("watermarks"), each("reproduced"),
                      _pairs(m, "agreed", "controls"),
                      each("p_value", "{:.2g}"), ", ".join("yes" if v else "no" for v in m["verified"]),
                      _pairs(m, "clients_accused", "clients"),
                      each("verification_queries"),
                      _pairs(m, "false_accusations", "independent_models"),
                      each("queries_needed"), each("accuracy_cost", "{:.2%}").replace("%", " pts"),
                      f"{100 * r['utility']['label_change_rate']['mean']:.2f}%"])
    return lines


def _each(measures: dict[str, list[float]], name: str, form: str = "{:.0f}") -> str:
    """A measure's per-seed values, formatted and comma-separated ("–" without any)."""
    return ", ".join(form.format(v) for v in measures.get(name, [])) or "–"


def _pairs(measures: dict[str, list[float]], part: str, whole: str) -> str:
    """``part/whole`` per seed, comma-separated."""
    return ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(measures[part], measures[whole]))


NOTE = ("Each copy is tested as DAWN proposes (Fisher's exact test of its agreement with the watermark labels "
        f"against its agreement with the control labels, alpha {ALPHA:g}, at most 2,000 records); 'false "
        "accusations' counts the independent models accused with the same records; 'queries needed' is the "
        "number of queries a copier must make, at the defence's rate, before its answers hold enough watermarks "
        "for any claim at alpha (every watermark reproduced, controls agreed at the copy's measured rate): "
        "below it, no test can prove the copy, however faithful.")


def main(argv: list[str] | None = None) -> None:
    from benchmarks import cells, grid, report
    from benchmarks.cache import default_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--models", default="softmax,mlp")
    parser.add_argument("--attacks", default=",".join(grid.OWNERSHIP_SUITE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", default=f"{WATERMARK_RATE:g}", help="the watermark rates r, comma-separated")
    parser.add_argument("--combined", action="store_true", help="also the watermark with round:2 and label_only")
    parser.add_argument("--no-adaptive", action="store_true")
    parser.add_argument("--cache", default=str(default_root()))
    parser.add_argument("--out", default="ownership.md")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = replace(grid.configure("default"), attacks=tuple(options.attacks.split(",")), against=None,
                     command="python -m benchmarks.ownership")
    rows: list[dict[str, Any]] = []
    for name in options.data.split(","):
        for kind in options.models.split(","):
            started = time.perf_counter()
            for rate in options.rates.split(","):
                for defence in watermark_defences(float(rate))[:3 if options.combined else 1]:
                    task = cells.CellTask(config, Path(options.cache), grid.Cell(name, kind, options.seed, defence.name))
                    rows += [cells.row(key, cells.spec_of(key[3]), [outcome])
                             for key, outcome in cells.defence_outcomes(task, defence, not options.no_adaptive)
                             if key[3].startswith(PREFIX)]
            print(f"{name} {kind}: {time.perf_counter() - started:.0f} s", flush=True)
            Path(options.out).write_text(report._markdown_table(section(rows)) + "\n\n" + NOTE + "\n")
    print(Path(options.out).read_text())


if __name__ == "__main__":
    main()
