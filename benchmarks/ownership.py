"""The ownership family: can the owner prove, after the fact, that a copy was made from its answers?

Threat model: nothing stopped the copier (every extraction attack of the suite succeeds against every
output defence); the API answers with ``watermark:0.005`` (``--rate``; DAWN, Szyller et al., ACM MM 2021) combined
with the other output defences, and keeps the watermark records. The owner then tests each copy with
``attacks.ownership.OwnershipTest`` at ``alpha = 1e-6`` on at most 2,000 records. No-model reference:
independent models (other seeds and architectures, trained on the owner's data and on the attacker's
own labelled data, one batched ensemble per architecture) tested against the same records must not be
accused. Adaptive attackers (Kerckhoffs: they know the scheme and r) on an augmented Copycat: one that
spreads its queries over 20 API keys, one that drops answers its own out-of-fold ensemble disagrees
with, one that distils its copy into a fresh model on fresh inputs.

Run as ``python -m benchmarks.ownership`` (a Markdown table on stdout and in ``--out``).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from attacks.ensemble import Architecture, TrainingConfig, train_ensemble
from attacks.extraction import labeller, train_copy
from attacks.ownership import ALPHA, OwnershipTest, Records, Verification, consistent_answers
from attacks.targets import OutputUnavailable
from benchmarks import run
from benchmarks.scenarios import ATTACK_SPECS, Context, Defence
from guard.middleware import GuardMiddleware

RATE = 0.005
SUITE = ("copycat", "copycat-k-center", "knockoff-adaptive", "jacobian", "equation-solving")
AUGMENTED_QUERIES = 4000
"""The augmented Copycat's queries: the attacker's pool and noisy variants of it (the suite's
attackers spend a few hundred, which carry about one watermark each at r = 0.005)."""
INDEPENDENT_ARCHITECTURES = (Architecture("softmax"), Architecture("mlp", 64), Architecture("mlp", 256, "tanh"))
INDEPENDENT_PER_ENSEMBLE = 9
"""Models per (training data, architecture): 2 x 3 x 9 = 54 independent models per target."""


@dataclass
class Row:
    """One copy (or the independent models, ``attacker`` naming them) tested against the records its
    attack left; ``false_accusations`` counts the independent models accused with these records."""

    dataset: str
    model: str
    defence: str
    attacker: str
    queries: int
    agreement: float
    verification: Verification
    false_accusations: int
    independent_min_p: float


def defences(rate: float) -> tuple[Defence, ...]:
    """The watermark alone and combined with rounding and with label-only answers."""
    mark = f"watermark:{rate:g}"
    return (Defence(mark, (mark,)), Defence(f"{mark}+round:2", (mark, "round:2")),
            Defence(f"{mark}+label_only", (mark, "label_only")))


def guard_of(app) -> GuardMiddleware:
    """The ``GuardMiddleware`` in a Starlette app's (built) middleware stack."""
    layer = app.middleware_stack
    while not isinstance(layer, GuardMiddleware):
        layer = layer.app
    return layer


def kept_records(app) -> Records:
    """The watermark records the app's guard kept (the owner's export)."""
    import asyncio

    kept = asyncio.run(guard_of(app).monitoring.watermarks.export())
    return Records.from_lines([record.encode() for record in kept])


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


def verify_copy(context: Context, app, predict: Callable[[np.ndarray], np.ndarray], attacker: str, queries: int,
                independent: Independent, test: OwnershipTest) -> Row:
    X_test, _ = context.part("test")
    records = kept_records(app)
    verification = test.run(predict, records)
    others = independent.judge(test, records)
    return Row(context.dataset.name, context.model_kind, context.defence.name, attacker, queries,
               float((predict(X_test) == context.labels_of(X_test)).mean()), verification,
               sum(v.overall.accused for v in others), min(v.overall.p_value for v in others))


def suite_rows(context: Context, attacks: tuple[str, ...], independent: Independent,
               test: OwnershipTest) -> Iterator[Row]:
    """Every suite attack that applies, against a fresh watermarked server, its copy verified."""
    for spec in (ATTACK_SPECS[name] for name in attacks):
        if spec.requires(context) or not spec.applies(context):
            continue
        app = run.guarded_app(context)
        with run.http_target(app, context.dataset.n_classes, context.dataset.n_features, False,
                             [run.ISSUED_KEYS[1]]) as target:
            try:
                result = spec.run(target, context)
            except OutputUnavailable:
                continue
            spent = target.queries
        yield verify_copy(context, app, labeller(result.artefacts["model"]), spec.name, spent, independent, test)


def augmented_queries(context: Context, n: int, seed: int) -> np.ndarray:
    """The attacker's pool, then noisy variants of it (Gaussian, sd 0.1, clipped to [0, 1]), ``n`` rows."""
    pool, _ = context.part("aux")
    rng = np.random.default_rng(seed)
    extra = pool[rng.integers(len(pool), size=max(n - len(pool), 0))]
    return np.concatenate([pool, np.clip(extra + rng.normal(0, 0.1, extra.shape), 0, 1)])[:n]


def adaptive_rows(context: Context, independent: Independent, test: OwnershipTest) -> Iterator[Row]:
    """The augmented Copycat, then each adaptive attacker, against fresh watermarked servers."""
    k, hidden = context.dataset.n_classes, context.hidden if context.model_kind == "mlp" else None
    X = augmented_queries(context, AUGMENTED_QUERIES, context.seed)

    def stolen(keys: list[str]) -> tuple[object, np.ndarray]:
        app = run.guarded_app(context)
        with run.http_target(app, k, context.dataset.n_features, False, keys) as target:
            target.batch_size = min(target.batch_size, 100)  # 40 requests, dealt over the keys
            return app, target.predict(X)

    def copy(inputs: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return labeller(train_copy(inputs, np.eye(k)[labels], hidden, epochs=100, seed=context.seed))

    app, answers = stolen([run.ISSUED_KEYS[1]])
    plain = copy(X, answers)
    yield verify_copy(context, app, plain, "augmented copycat", len(X), independent, test)
    sybil_app, sybil_answers = stolen(list(run.ATTACKER_KEYS[:run.SYBIL_KEYS]))
    yield verify_copy(context, sybil_app, copy(X, sybil_answers), f"… over {run.SYBIL_KEYS} keys",
                      len(X), independent, test)
    keep = consistent_answers(X, answers, k, context.architecture, TrainingConfig(epochs=60), seed=context.seed)
    yield verify_copy(context, app, copy(X[keep], answers[keep]), f"… dropping {int((~keep).sum())} answers "
                      "its ensemble disputes", len(X), independent, test)
    fresh = augmented_queries(context, AUGMENTED_QUERIES, context.seed + 1)
    yield verify_copy(context, app, copy(fresh, plain(fresh)), "… distilled on fresh inputs", len(X),
                      independent, test)


def cost(context: Context) -> tuple[float, float, float]:
    """Test accuracy undefended and defended (a benign client's answers), and the labels changed
    over every record of the data set."""
    X_all = context.dataset.X.astype(np.float64)
    X_test, y_test = context.part("test")
    app = run.guarded_app(context)
    with run.http_target(app, context.dataset.n_classes, context.dataset.n_features, False,
                         [run.BENIGN_KEY]) as target:
        served = target.predict(X_all)
    test_rows = context.split.test
    model = context.labels_of(X_all)
    return (float((model[test_rows] == y_test).mean()), float((served[test_rows] == y_test).mean()),
            float((served != model).mean()))


def table(rows: list[Row], costs: list[tuple[str, str, str, tuple[float, float, float]]], n_independent: int,
          rate: float) -> str:
    lines = [f"Ownership verification with `watermark:{rate:g}`: DAWN's test at alpha = {ALPHA:g} on at most "
             f"2,000 records; {n_independent} independent models per target tested against every copy's "
             "records.", "",
             "| data | model | defence | attacker | queries | agreement | watermarks | reproduced | controls "
             "agreed | p-value | verified | verification queries | false accusations | independent min p |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        e = r.verification.overall
        lines.append(f"| {r.dataset} | {r.model} | {r.defence} | {r.attacker} | {r.queries} | {r.agreement:.3f} | "
                     f"{e.watermarks} | {e.reproduced} | {e.agreed}/{e.controls} | {e.p_value:.2g} | "
                     f"{'yes' if e.accused else 'no'} | {r.verification.queries} | {r.false_accusations}/"
                     f"{n_independent} | {r.independent_min_p:.2g} |")
    lines += ["", "Cost to legitimate clients (test accuracy undefended, defended; labels changed over the "
              "whole data set):", "", "| data | model | defence | accuracy | with watermark | cost (points) | "
              "labels changed |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for dataset, model, defence, (before, after, changed) in costs:
        lines.append(f"| {dataset} | {model} | {defence} | {before:.4f} | {after:.4f} | "
                     f"{100 * (before - after):.2f} | {changed:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits,faces")
    parser.add_argument("--models", default="softmax,mlp")
    parser.add_argument("--attacks", default=",".join(SUITE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=RATE, help="the watermark's rate r")
    parser.add_argument("--no-adaptive", action="store_true")
    parser.add_argument("--out", default="ownership.md")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = run.BenchConfig(command="python -m benchmarks.ownership")
    test = OwnershipTest()
    rows, costs, trained, n_independent = [], [], {}, 0
    for name in options.data.split(","):
        for kind in options.models.split(","):
            started = time.perf_counter()
            served = defences(options.rate)
            base = run._context(config, name, kind, served[0], options.seed, trained)
            independent = Independent(base, options.seed)
            n_independent = len(independent)
            for defence in served:
                context = replace(base, defence=defence)
                costs.append((name, kind, defence.name, cost(context)))
                rows += suite_rows(context, tuple(options.attacks.split(",")), independent, test)
            if not options.no_adaptive:
                rows += adaptive_rows(base, independent, test)
            print(f"{name} {kind}: {time.perf_counter() - started:.0f} s", flush=True)
            Path(options.out).write_text(table(rows, costs, n_independent, options.rate) + "\n")
    print(Path(options.out).read_text())


if __name__ == "__main__":
    main()
