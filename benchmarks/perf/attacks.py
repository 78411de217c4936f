"""Attack-suite benchmark on digits: each attack's wall time, queries and measures, as tables.

Run: ``python -m benchmarks.perf.attacks [--quick] [--only SECTION ...]``.
Each section is a function ``(quick: bool) -> list[dict]`` registered with ``@section``; it returns
table rows (column -> value) that ``main`` prints.
"""
from __future__ import annotations

import argparse
from typing import Callable

Rows = list[dict[str, object]]
SECTIONS: dict[str, Callable[[bool], Rows]] = {}


def section(name: str) -> Callable[[Callable[[bool], Rows]], Callable[[bool], Rows]]:
    def register(function: Callable[[bool], Rows]) -> Callable[[bool], Rows]:
        SECTIONS[name] = function
        return function

    return register


def print_table(title: str, rows: Rows) -> None:
    print(f"\n## {title}\n")
    if not rows:
        print("(no rows)")
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print(" | ".join(column.ljust(width) for column, width in zip(columns, widths)))
    print("-|-".join("-" * width for width in widths))
    for line in cells:
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def _format(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@section("inversion")
def inversion(quick: bool) -> Rows:
    """MI-Face (white-box on an MLP and softmax regression, black-box on the MLP), the inverse model
    and MAP attribute inference against MLPs, with full, rounded and label-only answers.
    Identification is by an RBF SVM trained on the test split (chance 0.1); MI-Face's errors are to the class means, its baseline the aux mean image's; the
    inverse model's to the victims' inputs; MAP's baseline guesses the prior's mode. Randomised
    attacks are averaged over ``runs`` seeds (MAP: over target models trained on 5 splits)."""
    import itertools
    import time

    import numpy as np
    import torch
    from sklearn.svm import SVC

    from attacks.inversion import (
        DenoisingAutoencoder,
        ImageFilter,
        InverseModel,
        MAPAttribute,
        MIFace,
        MIFaceBlackBox,
    )
    from attacks.targets import CallableTarget, OutputFormat, TorchTarget
    from benchmarks import datasets, models
    from benchmarks.tabular import sensitive_breast_cancer

    digits = datasets.load("digits")
    part = datasets.split(digits, seed=0)
    X, y = digits.X, digits.y
    mlp, softmax = (models.train_target(kind, X[part.train], y[part.train], 10, seed=0, epochs=60)
                    for kind in ("mlp", "softmax"))
    evaluator = SVC().fit(X[part.test], y[part.test]).predict
    means = np.stack([X[part.train][y[part.train] == label].mean(axis=0) for label in range(10)])
    prior_error = float(np.mean((X[part.aux].mean(axis=0) - means) ** 2))
    victims = part.train[:200]
    formats = {"full": OutputFormat(), "round:2": OutputFormat(rounding=2), "round:1": OutputFormat(rounding=1),
               "label_only": OutputFormat(label_only=True)}
    alpha, directions, epochs = (300, 8, 60) if quick else (5000, 32, 150)
    rows: Rows = []

    def measure(attack: str, output: str, runs: list[Callable[[], object]], shown=None, **extra: object) -> None:
        """One row: mean seconds, queries and metrics over ``runs`` (repeats with different seeds)."""
        start = time.perf_counter()
        results = [run() for run in runs]
        keys = shown or list(results[0].metrics)
        rows.append({"attack": attack, "output": output, "seconds": (time.perf_counter() - start) / len(runs),
                     "queries": float(np.mean([result.queries for result in results])), "runs": len(runs),
                     **extra, **{key: float(np.mean([result.metrics[key] for result in results])) for key in keys}})

    def api(output: OutputFormat, model=mlp) -> CallableTarget:
        return CallableTarget(lambda batch: models.predict_proba(model, batch), model[-1].out_features, output=output)

    seeds = range(1 if quick else 3)
    dae = DenoisingAutoencoder().fit(X[part.aux])
    processes = {"clip": None, "filter": ImageFilter((8, 8)), "dae": dae}
    for (model_name, model), (process_name, process) in itertools.product(
            {"mlp": mlp, "softmax": softmax}.items(), processes.items()):
        measure("mi-face", "white-box", [lambda model=model, process=process: MIFace(alpha=alpha, process=process)
                                         .run(TorchTarget(model, 10), 64, references=means, evaluator=evaluator)],
                model=model_name, process=process_name, baseline_reconstruction_error=prior_error)
    for name, output in formats.items():
        measure("mi-face-blackbox", name, [
            lambda seed=seed, output=output: MIFaceBlackBox(alpha=alpha, directions=directions, output=output,
                                                            process=dae, seed=seed)
            .run(api(output), 64, references=means, evaluator=evaluator) for seed in seeds],
                model="mlp", process="dae", baseline_reconstruction_error=prior_error)
    for name, output in formats.items():
        observed = output.apply(models.predict_proba(mlp, X[victims]))
        measure("inverse-model", name, [
            lambda seed=seed, output=output, observed=observed: InverseModel(epochs=epochs, output=output, seed=seed)
            .run(api(output), X[part.aux], observed, X[victims], y[victims], evaluator) for seed in seeds],
                model="mlp")
    hidden = lambda batch: mlp[:2](torch.as_tensor(batch, dtype=torch.float32)).detach().numpy()
    measure("inverse-model", "hidden layer", [
        lambda seed=seed: InverseModel(epochs=epochs, representation=hidden, seed=seed).run(
            TorchTarget(mlp, 10), X[part.aux], hidden(X[victims]), X[victims], y[victims], evaluator)
        for seed in seeds], model="mlp")

    data = sensitive_breast_cancer()
    T, labels = data.dataset.X, data.dataset.y
    cuts = [datasets.split(data.dataset, seed=seed) for seed in range(1 if quick else 5)]
    targets = [models.train_target("mlp", T[cut.train], labels[cut.train], 2, seed=seed, epochs=100)
               for seed, cut in enumerate(cuts)]
    shown = ["accuracy", "precision", "baseline_accuracy", "baseline_precision", "members_accuracy",
             "members_precision", "nonmembers_accuracy", "nonmembers_precision"]

    def infer_attribute(cut: datasets.Split, model, output: OutputFormat):
        records = np.concatenate([cut.train, cut.test])
        return MAPAttribute(data.attribute, data.values).run(
            api(output, model), T[records], labels[records], T[cut.aux], labels[cut.aux],
            truth=T[records, data.attribute], members=np.arange(len(records)) < len(cut.train))

    for name in ("full", "round:1", "label_only"):
        measure("map-attribute", name, [lambda cut=cut, model=model, name=name: infer_attribute(cut, model, formats[name])
                                        for cut, model in zip(cuts, targets)], shown=shown, model="mlp (tabular)")
    return rows


@section("shadow-ensemble")
def shadow_ensemble(quick: bool) -> Rows:
    """64 shadow MLPs (64 hidden units) on random halves of digits: one vectorised ensemble
    (``attacks.ensemble``) against a plain loop of ``benchmarks.models.train_target`` (same epochs, Adam,
    lr and batch size), with each set's mean held-out accuracy; both warmed up first."""
    import time

    import numpy as np

    from attacks.ensemble import TrainingConfig, random_halves, train_ensemble
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    masks = random_halves(len(digits.y), 64, seed=0)
    config = TrainingConfig(epochs=10 if quick else 60)
    train_ensemble(digits.X, digits.y, masks[:2], 10, config=TrainingConfig(epochs=1))
    models.train_target("mlp", digits.X[masks[0]], digits.y[masks[0]], 10, epochs=1)

    start = time.perf_counter()
    ensemble = train_ensemble(digits.X, digits.y, masks, 10, config=config)
    ensemble_seconds = time.perf_counter() - start
    correct = ensemble.predict_proba(digits.X).argmax(axis=2) == digits.y
    ensemble_accuracy = float(np.mean([correct[i][~mask].mean() for i, mask in enumerate(masks)]))

    start = time.perf_counter()
    loop = [models.train_target("mlp", digits.X[mask], digits.y[mask], 10, seed=i, epochs=config.epochs,
                                lr=config.lr, batch_size=config.batch_size) for i, mask in enumerate(masks)]
    loop_seconds = time.perf_counter() - start
    loop_accuracy = float(np.mean([models.accuracy(model, digits.X[~mask], digits.y[~mask])
                                   for model, mask in zip(loop, masks)]))
    return [
        {"training": "loop of single models", "models": 64, "epochs": config.epochs, "seconds": loop_seconds,
         "held_out_accuracy": loop_accuracy, "speed-up": 1.0},
        {"training": "vectorised ensemble", "models": 64, "epochs": config.epochs, "seconds": ensemble_seconds,
         "held_out_accuracy": ensemble_accuracy, "speed-up": loop_seconds / ensemble_seconds},
    ]


@section("membership")
def membership(quick: bool) -> Rows:
    """The LiRA game on digits: an MLP (64 hidden, Adam lr 1e-2, 60 epochs, no weight decay) trained on
    a random half; every record is a candidate. Each attack's wall time (LiRA offline and the rounded
    / shifted LiRA rows reuse the online run's references), queries, AUC and TPR at 1% / 0.1% FPR."""
    import time

    import numpy as np

    from attacks.membership import LabelOnlyAttack, LiRA, ShadowModelAttack, ThresholdAttack
    from attacks.targets import OutputFormat, TorchTarget
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    X, y = digits.X, digits.y
    member = np.zeros(len(y), dtype=bool)
    member[np.random.default_rng(0).permutation(len(y))[: len(y) // 2]] = True
    model = models.train_target("mlp", X[member], y[member], 10, seed=0, epochs=60)
    references, shadows = (16, 4) if quick else (64, 16)
    full, rounded = OutputFormat(), OutputFormat(rounding=2)
    labels = OutputFormat(label_only=True)
    rows: Rows = []

    def measure(name: str, output: OutputFormat, attack, **extra):
        start = time.perf_counter()
        result = attack.run(TorchTarget(model, 10, output=output), X, y, is_member=member, **extra)
        rows.append({"attack": name, "output": "label_only" if output.label_only else
                     f"round:{output.rounding}" if output.rounding else "full",
                     "seconds": time.perf_counter() - start, "queries": result.queries,
                     **{key: result.metrics[key] for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}})
        return result

    measure("threshold (loss)", full, ThresholdAttack("loss"))
    measure("threshold (confidence)", full, ThresholdAttack("confidence"))
    online = measure(f"lira online ({references} refs)", full, LiRA(references))
    reuse = online.artefacts["references"]
    measure(f"lira offline ({references} refs)", full, LiRA(references, offline=True), references=reuse)
    measure("lira online, shifted queries", full, LiRA(references, image_shape=(8, 8), max_shift=1),
            references=reuse)
    measure("lira online, adaptive", rounded, LiRA(references, output=rounded), references=reuse)
    measure("threshold (loss)", rounded, ThresholdAttack("loss", output=rounded))
    measure(f"shadow ({shadows} shadows)", full, ShadowModelAttack(shadows), population=(X, y))
    measure("gap (threshold)", labels, ThresholdAttack(output=labels))
    measure("label-only noise", labels, LabelOnlyAttack("noise"))
    measure("label-only augmentation", labels, LabelOnlyAttack("augmentation", image_shape=(8, 8)))
    measure("label-only boundary", labels, LabelOnlyAttack("boundary"))
    return rows


@section("extraction")
def extraction(quick: bool) -> Rows:
    """Extraction on digits (split seed 0): equation-solving against a softmax regression with full and
    rounded answers (plain and rounding-aware), and against a 16-unit MLP whose width the attacker
    knows (full runs only; best of 8 L-BFGS starts); copycat, knockoff (random, adaptive) and jacobian against the 64-unit MLP
    from probabilities and from labels. Agreement is measured against the target's labels on the test
    split and on 10,000 uniform inputs; ``curve`` is test agreement at growing query counts."""
    import time

    import torch

    from attacks.extraction import Copycat, EquationSolving, JacobianAugmentation, Knockoff
    from attacks.targets import OutputFormat, TorchTarget
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    split = datasets.split(digits, seed=0)
    X_train, y_train = digits.X[split.train], digits.y[split.train]
    X_test, y_test, aux = digits.X[split.test], digits.y[split.test], digits.X[split.aux]
    softmax = models.train_target("softmax", X_train, y_train, 10, seed=0, epochs=60)
    mlp = models.train_target("mlp", X_train, y_train, 10, seed=0, epochs=60)
    torch.manual_seed(0)
    narrow = models.train(models.make_model("mlp", 64, 10, hidden=16), X_train, y_train, epochs=60, seed=0)
    epochs = 60 if quick else 150
    rows: Rows = []

    def measure(name: str, model, output: OutputFormat, attack, **extra) -> None:
        start = time.perf_counter()
        result = attack.run(TorchTarget(model, 10, output=output), X_test, y_test,
                            oracle=lambda X: models.predict_proba(model, X).argmax(axis=1), **extra)
        curve = result.artefacts.get("curve", {"queries": [], "agreement": []})
        rows.append({"attack": name, "target": {softmax: "softmax", mlp: "mlp-64", narrow: "mlp-16"}[model],
                     "output": "label_only" if output.label_only else
                     f"round:{output.rounding}" if output.rounding else "full",
                     "seconds": time.perf_counter() - start, "queries": result.queries,
                     **{key: result.metrics.get(key, float("nan"))
                        for key in ("agreement_test", "agreement_uniform", "accuracy_test")},
                     "curve": " ".join(f"{q}:{a:.3f}" for q, a in zip(curve["queries"], curve["agreement"]))})

    full, labels = OutputFormat(), OutputFormat(label_only=True)
    measure("equation-solving", softmax, full, EquationSolving())
    for decimals in (2, 1):
        rounded = OutputFormat(rounding=decimals)
        measure("equation-solving (plain)", softmax, rounded, EquationSolving(curve_points=1))
        measure("equation-solving (rounding-aware)", softmax, rounded,
                EquationSolving(rounding=decimals, curve_points=1))
    if not quick:
        for factor in (1, 2, 4):
            measure(f"equation-solving ({factor}x unknowns)", narrow, full,
                    EquationSolving(hidden=16, query_factor=factor, restarts=8, curve_points=1))
    for output in (full, labels):
        measure("copycat", mlp, output, Copycat(labels_only=False, epochs=epochs), aux=aux)
        measure("knockoff random", mlp, output, Knockoff("random", 200, epochs=epochs), aux=aux)
        measure("knockoff adaptive", mlp, output, Knockoff("adaptive", 200, epochs=epochs), aux=aux)
        measure("jacobian", mlp, output, JacobianAugmentation(labels_only=False, epochs=epochs), aux=aux)
    return rows


@section("equivalent")
def equivalent(quick: bool) -> Rows:
    """Functionally equivalent extraction (Jagielski et al. 2020, sec. 5) of the digits MLP (64 ReLU units,
    60 epochs, split seed 0) over attack seeds, from probabilities and rounded to 2 decimals, beside equation
    solving of the same architecture as the bench runs it (one L-BFGS start, 300 iterations)."""
    import time

    from attacks.equivalent import FunctionallyEquivalent
    from attacks.extraction import EquationSolving
    from attacks.targets import OutputFormat, TorchTarget
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    split = datasets.split(digits, seed=0)
    mlp = models.train_target("mlp", digits.X[split.train], digits.y[split.train], 10, seed=0, epochs=60)
    X_test, y_test, aux = digits.X[split.test], digits.y[split.test], digits.X[split.aux]
    oracle = lambda X: models.predict_proba(mlp, X).argmax(axis=1)  # noqa: E731
    runs = [(f"functionally-equivalent seed {seed}", OutputFormat(), FunctionallyEquivalent(64, seed=seed))
            for seed in range(1 if quick else 4)]
    runs += [("functionally-equivalent seed 0", OutputFormat(rounding=2), FunctionallyEquivalent(64, seed=0)),
             ("equation-solving", OutputFormat(), EquationSolving(64, restarts=1, max_iter=300, seed=0))]
    rows: Rows = []
    for name, output, attack in runs:
        start = time.perf_counter()
        extra = {"aux": aux} if isinstance(attack, FunctionallyEquivalent) else {}
        result = attack.run(TorchTarget(mlp, 10, output=output), X_test, y_test, oracle=oracle, **extra)
        rows.append({"attack": name, "output": f"round:{output.rounding}" if output.rounding else "full",
                     "seconds": time.perf_counter() - start, "queries": result.queries,
                     **{key: result.metrics.get(key, float("nan"))
                        for key in ("agreement_test", "agreement_uniform", "units_found")}})
    return rows


@section("adaptive")
def adaptive(quick: bool) -> Rows:
    """Each output defence against the adaptive attack that knows it, in the LiRA game
    on digits (MLP trained on a random half, every record a candidate; target seeds 0-2, 0 with
    ``--quick``, one set of references for all): TPR at 1% FPR, mean over the seeds and per seed, with
    its 95% Clopper-Pearson interval pooled over the seeds' members, beside the attack the defence was
    tuned against. The answers come from ``guard.outputs`` exactly as the middleware would send them."""
    import time

    import numpy as np

    from attacks.membership import LabelOnlyAttack, LiRA
    from attacks.observations import (AveragedNoise, BoundaryDistance, InvertedReverseSigmoid, LabelRobustness,
                                      RoundedInterval)
    from attacks.scoring import clopper_pearson
    from attacks.targets import CallableTarget, OutputFormat
    from benchmarks import datasets, models
    from guard.outputs import Pipeline

    digits = datasets.load("digits")
    X, y = digits.X.astype(np.float64), digits.y
    games = []
    for seed in range(1 if quick else 3):
        member = np.zeros(len(y), dtype=bool)
        member[np.random.default_rng(seed).permutation(len(y))[: len(y) // 2]] = True
        games.append((models.train_target("mlp", X[member], y[member], 10, seed=seed, epochs=60), member))
    n_references = 16 if quick else 64
    references = LiRA(n_references).train_references(X, y, 10)
    rows: Rows = []

    def api(model, specs: list[str]) -> CallableTarget:
        pipeline = Pipeline.from_specs(specs, secret=b"benchmark-secret")
        return CallableTarget(lambda batch: pipeline(models.predict_proba(model, batch), batch), 10,
                              output=OutputFormat(label_only=pipeline.label_only))

    def measure(defence: str, attack: str, specs: list[str], run) -> None:
        start = time.perf_counter()
        results = [run(api(model, specs), member) for model, member in games]
        seconds = (time.perf_counter() - start) / len(games)
        tprs = [result.metrics["tpr_at_1pct_fpr"] for result in results]
        members = sum(int(member.sum()) for _, member in games)
        low, high = clopper_pearson(sum(t * member.sum() for t, (_, member) in zip(tprs, games)), members)
        learnt = {key: float(np.mean([result.metrics[key] for result in results]))
                  for key in ("beta", "gamma", "inverted", "repeats", "step") if key in results[0].metrics}
        rows.append({"defence": defence, "attack": attack, "tpr_at_1pct_fpr": float(np.mean(tprs)),
                     "per_seed": " ".join(f"{t:.3f}" for t in tprs), "ci_low": low, "ci_high": high,
                     "tpr_at_0.1pct_fpr": float(np.mean([r.metrics["tpr_at_0.1pct_fpr"] for r in results])),
                     "auc": float(np.mean([r.metrics["auc"] for r in results])),
                     "queries": results[0].queries, "seconds": seconds, **learnt})

    def lira(statistic=None, offline=False):
        return lambda target, member: LiRA(n_references, offline=offline, statistic=statistic).run(
            target, X, y, is_member=member, references=references)

    n_noise = 16 if quick else 32
    measure("none", f"lira online ({n_references} refs)", [], lira())
    measure("label_only", "label-only noise (uncalibrated)", ["label_only"],
            lambda target, member: LabelOnlyAttack("noise", n_noise=n_noise).run(target, X, y, is_member=member))
    measure("label_only", "label-only noise, calibrated online", ["label_only"], lira(LabelRobustness(n_noise)))
    measure("label_only", "label-only noise, calibrated offline", ["label_only"],
            lira(LabelRobustness(n_noise), offline=True))
    measure("label_only", "label-only boundary distance (uncalibrated)", ["label_only"],
            lambda target, member: LabelOnlyAttack("boundary").run(target, X, y, is_member=member))
    measure("label_only", "label-only boundary distance, calibrated online", ["label_only"], lira(BoundaryDistance()))
    measure("top_k:1", "label-only noise, calibrated online", ["top_k:1"], lira(LabelRobustness(n_noise)))
    rs = ["reverse_sigmoid:0.7:0.4"]
    measure("reverse_sigmoid:0.7:0.4", "lira (as published)", rs, lira())
    measure("reverse_sigmoid:0.7:0.4", "lira, inverted (beta, gamma known)", rs, lira(InvertedReverseSigmoid(0.7, 0.4)))
    measure("reverse_sigmoid:0.7:0.4", "lira, inverted (beta, gamma estimated)", rs, lira(InvertedReverseSigmoid()))
    measure("noise:0.5", "lira (as published)", ["noise:0.5"], lira())
    measure("noise:0.5", f"lira, averaged ({n_noise * 2} repeats)", ["noise:0.5"], lira(AveragedNoise(0.5, 2 * n_noise)))
    for decimals in (2, 1):
        rounded = [f"round:{decimals}"]
        measure(rounded[0], "lira (published, adaptive)", rounded, lira())
        measure(rounded[0], "lira, rounding interval", rounded, lira(RoundedInterval(decimals)))
    return rows


@section("adaptive-inversion")
def adaptive_inversion(quick: bool) -> Rows:
    """The inverse model (Yang et al. 2019) against each confidence-perturbing defence, as published and
    undone by the attacker who knows the defence (``attacks.undoing``), in the bench's inversion game
    (``benchmarks.scenarios.InversionSetting``): digits split as the bench splits it (seeds 0-2, 0
    with ``--quick``), the softmax and MLP targets trained on the target half, victims a seeded half of
    the classes, the attacker's records those of the other classes; advantage in line-up accuracy over
    the no-model reference (mean and per seed). The answers come from ``guard.outputs`` exactly as the
    middleware would send them."""
    import time

    import numpy as np

    from attacks.inversion import InverseModel
    from attacks.scoring import Judge
    from attacks.targets import CallableTarget
    from attacks.undoing import averaging, inverting_reverse_sigmoid
    from benchmarks import datasets, models
    from benchmarks.scenarios import InversionSetting
    from guard.outputs import Pipeline

    digits = datasets.load("digits")
    games = {}
    for kind in ("softmax", "mlp"):
        for seed in range(1 if quick else 3):
            split = datasets.split(digits, seed)
            model = models.train_target(kind, digits.X[split.train], digits.y[split.train], 10, seed=seed, epochs=60)
            test_y = digits.y[split.test]
            classes = np.sort(np.random.default_rng(seed).permutation(np.unique(test_y))[:5])
            others = ~np.isin(digits.y, classes)
            judged = np.isin(test_y, classes)
            setting = InversionSetting(classes, digits.X[others], digits.y[others],
                                       Judge(digits.X[split.test][judged], test_y[judged], digits.image_shape, seed=seed))
            train_X, train_y = digits.X[split.train], digits.y[split.train]
            victims = np.isin(train_y, classes)
            games.setdefault(kind, []).append((model, setting, train_X[victims][:200], train_y[victims][:200]))
    rows: Rows = []

    def api(model, specs: list[str]) -> CallableTarget:
        pipeline = Pipeline.from_specs(specs, secret=b"benchmark-secret")
        return CallableTarget(lambda batch: pipeline(models.predict_proba(model, batch), batch), 10)

    def measure(kind: str, defence: str, attack: str, specs: list[str], undo=lambda target: target) -> None:
        start = time.perf_counter()
        advantages, learnt = [], []
        for seed, (model, setting, victims_X, victims_y) in enumerate(games[kind]):
            target = undo(api(model, specs))
            observed = target.predict_proba(victims_X)
            result = InverseModel(epochs=60 if quick else 150, seed=seed).run(target, setting.aux_X, observed)
            advantages.append(setting.measures(result.artefacts["reconstructions"], victims_y)["advantage_lineup_accuracy"])
            learnt.append(getattr(target, "learnt", {}))
        rows.append({"model": kind, "defence": defence, "attack": attack,
                     "advantage_lineup": float(np.mean(advantages)), "per_seed": " ".join(f"{a:.3f}" for a in advantages),
                     **{key: float(np.mean([entry[key] for entry in learnt])) for key in learnt[0]},
                     "queries": target.queries, "seconds": (time.perf_counter() - start) / len(games[kind])})

    for kind in games:
        rs = ["reverse_sigmoid:0.7:0.4"]
        measure(kind, "none", "inverse model", [])
        measure(kind, rs[0], "inverse model (as published)", rs)
        measure(kind, rs[0], "inverse model, inverted (beta, gamma known)", rs,
                lambda target: inverting_reverse_sigmoid(target, 0.7, 0.4))
        measure(kind, rs[0], "inverse model, inverted (beta, gamma estimated)", rs, inverting_reverse_sigmoid)
        measure(kind, "noise:0.5", "inverse model (as published)", ["noise:0.5"])
        measure(kind, "noise:0.5", "inverse model, averaged (32 repeats)", ["noise:0.5"], averaging)
    return rows


@section("extraction-budget")
def extraction_budget(quick: bool) -> Rows:
    """Label-only copies of the digits MLP (64 hidden, 60 epochs) from small budgets, over several data
    splits: Copycat with random pool queries against k-center queries; test agreement at 56, 112 and
    450 queries (mean and range over the splits)."""
    import numpy as np

    from attacks.extraction import Copycat
    from attacks.targets import OutputFormat, TorchTarget
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    seeds = range(2 if quick else 5)
    results: dict[tuple[str, int], list[float]] = {}
    for seed in seeds:
        split = datasets.split(digits, seed=seed)
        model = models.train_target("mlp", digits.X[split.train], digits.y[split.train], 10, seed=seed, epochs=60)
        oracle = lambda X, model=model: models.predict_proba(model, X).argmax(axis=1)  # noqa: E731
        for selection in ("random", "k-center"):
            for budget in (56, 112, 450):
                result = Copycat(budget, selection=selection, curve_points=1, seed=seed).run(
                    TorchTarget(model, 10, output=OutputFormat(label_only=True)), digits.X[split.test],
                    aux=digits.X[split.aux], oracle=oracle)
                results.setdefault((selection, budget), []).append(result.metrics["agreement_test"])
    return [{"attack": f"copycat ({selection})", "queries": budget, "splits": len(values),
             "agreement_mean": float(np.mean(values)), "agreement_min": float(np.min(values)),
             "agreement_max": float(np.max(values))} for (selection, budget), values in results.items()]


@section("rmia")
def rmia(quick: bool) -> Rows:
    """RMIA (Zarifzadeh et al. 2024) against LiRA (Carlini et al. 2022) at equal reference-model counts,
    in RMIA's game on digits: a seeded half of the records is the target's pool (the candidates; the
    target, an MLP of 64 units or a softmax regression, 60 epochs, trains on a random half of it), the
    other half the attacker's population (RMIA's z and the offline references' data). Online, both
    attacks share references trained on random halves of the candidates (the target's training size);
    offline, references trained on random halves of the population (every candidate OUT). TPR at 1% and
    0.1% FPR: mean over target seeds 0-2 (0 with ``--quick``), per seed, and the 95% Clopper-Pearson
    interval at 1% pooled over the seeds' members; chance (no model) is TPR = FPR."""
    import numpy as np

    from attacks.ensemble import Architecture
    from attacks.membership import RMIA, LiRA
    from attacks.scoring import clopper_pearson
    from attacks.targets import TorchTarget
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    X, y = digits.X.astype(np.float64), digits.y
    seeds = range(1 if quick else 3)
    counts = (1, 2, 4) if quick else (1, 2, 4, 8, 32)
    results: dict[tuple[str, str, int, str], list[tuple[dict[str, float], int]]] = {}
    for kind in ("mlp", "softmax"):
        architecture = Architecture(kind)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(y))
            pool, population = order[: len(y) // 2], order[len(y) // 2:]
            candidates = (X[pool], y[pool])
            member = np.zeros(len(pool), dtype=bool)
            member[rng.permutation(len(pool))[: len(pool) // 2]] = True
            model = models.train_target(kind, X[pool][member], y[pool][member], 10, seed=seed, epochs=60)
            target = TorchTarget(model, 10)
            z = (X[population], y[population])
            for count in counts:
                for offline in (False, True):
                    if count < 2 and not offline:
                        continue  # online needs an IN and an OUT model for every candidate
                    mode = "offline" if offline else "online"
                    attack = RMIA(count, offline=offline, architecture=architecture, seed=seed)
                    pooled = z if offline else None  # online: references on halves of the candidates only
                    references = attack.train_references(*candidates, 10, pooled)
                    outcomes = {
                        "rmia": attack.run(target, *candidates, population=z, is_member=member, references=references),
                        "lira": LiRA(count, offline=offline, architecture=architecture, seed=seed).run(
                            target, *candidates, population=pooled, is_member=member, references=references)}
                    for name, outcome in outcomes.items():
                        results.setdefault((kind, mode, count, name), []).append((outcome.metrics, int(member.sum())))
    rows: Rows = []
    for (kind, mode, count, name), runs in results.items():
        tprs = [metrics["tpr_at_1pct_fpr"] for metrics, _ in runs]
        members = sum(size for _, size in runs)
        low, high = clopper_pearson(sum(t * size for t, (_, size) in zip(tprs, runs)), members)
        rows.append({"model": kind, "mode": mode, "references": count, "attack": name,
                     "tpr_at_1pct_fpr": float(np.mean(tprs)), "ci_low": low, "ci_high": high,
                     "per_seed": " ".join(f"{t:.3f}" for t in tprs),
                     "tpr_at_0.1pct_fpr": float(np.mean([m["tpr_at_0.1pct_fpr"] for m, _ in runs])),
                     "auc": float(np.mean([m["auc"] for m, _ in runs])),
                     "a": float(np.mean([m.get("a", np.nan) for m, _ in runs]))})
    return rows


@section("label-only-boundary")
def label_only_boundary(quick: bool) -> Rows:
    """Label-only membership on the digits targets (MLP and softmax regression, each trained on a random
    half, every record a candidate; seeds 0-2, 0 with ``--quick``; one set of references per model kind):
    the boundary-distance attack with HopSkipJump (Li & Zhang 2021; ``max_queries`` per candidate),
    uncalibrated and calibrated per example (online and offline), beside the calibrated noise-robustness
    attack the bench runs and the calibrated random-direction boundary distance. TPR at 1% FPR, mean over
    the seeds and per seed, with its 95% Clopper-Pearson interval pooled over the seeds' members."""
    import time

    import numpy as np

    from attacks.ensemble import Architecture
    from attacks.hopskipjump import HopSkipJump
    from attacks.membership import LabelOnlyAttack, LiRA
    from attacks.observations import BoundaryDistance, HopSkipJumpDistance, LabelRobustness
    from attacks.scoring import clopper_pearson
    from attacks.targets import OutputFormat, TorchTarget
    from benchmarks import datasets, models

    digits = datasets.load("digits")
    X, y = digits.X.astype(np.float64), digits.y
    n_references, budget = (16, 300) if quick else (32, 300)
    search = HopSkipJump(max_queries=budget, initial_samples=25)
    rows: Rows = []
    for kind in ("mlp", "softmax"):
        games = []
        for seed in range(1 if quick else 3):
            member = np.zeros(len(y), dtype=bool)
            member[np.random.default_rng(seed).permutation(len(y))[: len(y) // 2]] = True
            games.append((models.train_target(kind, X[member], y[member], 10, seed=seed, epochs=60), member))
        architecture = Architecture(kind)
        references = LiRA(n_references, architecture=architecture).train_references(X, y, 10)

        def calibrated(statistic, offline=False, architecture=architecture, references=references):
            return lambda target, is_member: LiRA(n_references, offline=offline, architecture=architecture,
                                                  statistic=statistic).run(target, X, y, is_member=is_member,
                                                                           references=references)

        attacks = {
            "noise robustness (32), calibrated online": calibrated(LabelRobustness(32)),
            "boundary, random directions, calibrated online": calibrated(BoundaryDistance()),
            f"hopskipjump boundary ({budget} queries), uncalibrated": lambda target, member: LabelOnlyAttack(
                "hopskipjump", hopskipjump=search).run(target, X, y, is_member=member),
            f"hopskipjump boundary ({budget} queries), calibrated online": calibrated(HopSkipJumpDistance(search)),
            f"hopskipjump boundary ({budget} queries), calibrated offline": calibrated(HopSkipJumpDistance(search),
                                                                                      offline=True),
        }
        for name, run in attacks.items():
            start = time.perf_counter()
            results = [run(TorchTarget(model, 10, output=OutputFormat(label_only=True)), member)
                       for model, member in games]
            tprs = [result.metrics["tpr_at_1pct_fpr"] for result in results]
            members = sum(int(member.sum()) for _, member in games)
            low, high = clopper_pearson(sum(t * member.sum() for t, (_, member) in zip(tprs, games)), members)
            rows.append({"model": kind, "attack": name, "tpr_at_1pct_fpr": float(np.mean(tprs)),
                         "per_seed": " ".join(f"{t:.3f}" for t in tprs), "ci_low": low, "ci_high": high,
                         "auc": float(np.mean([r.metrics["auc"] for r in results])),
                         "queries": results[0].queries, "seconds": (time.perf_counter() - start) / len(games)})
    return rows


@section("attribute")
def attribute(quick: bool) -> Rows:
    """Attribute inference on the breast-cancer table (``benchmarks.tabular``; MLP targets, 100 epochs, on
    5 splits, 2 with ``--quick``): MAP, the learned attack model and the membership-based attack, with
    confidences and with labels only, beside the no-model reference (the best predictor the attacker
    trains on its own records). Accuracy on all victims and on the members, pooled over the splits, each
    with its 95% Clopper-Pearson interval."""
    import numpy as np

    from attacks.attribute import LearnedAttribute, MembershipAttribute
    from attacks.inversion import MAPAttribute, MAPAttributeLabelOnly
    from attacks.membership import ThresholdAttack
    from attacks.scoring import clopper_pearson
    from attacks.targets import CallableTarget, OutputFormat
    from benchmarks import datasets, models
    from benchmarks.tabular import sensitive_breast_cancer

    data = sensitive_breast_cancer()
    T, labels, column, values = data.dataset.X.astype(np.float64), data.dataset.y, data.attribute, data.values
    cuts = [datasets.split(data.dataset, seed=seed) for seed in range(2 if quick else 5)]
    targets = [models.train_target("mlp", T[cut.train], labels[cut.train], 2, seed=seed, epochs=100)
               for seed, cut in enumerate(cuts)]
    full, label_only = OutputFormat(), OutputFormat(label_only=True)
    attacks = {("map", "full"): lambda: MAPAttribute(column, values, positive=1.0),
               ("map", "label_only"): lambda: MAPAttributeLabelOnly(column, values, positive=1.0),
               ("learned", "full"): lambda: LearnedAttribute(column, values, positive=1.0),
               ("learned", "label_only"): lambda: LearnedAttribute(column, values, positive=1.0),
               ("membership (loss threshold)", "full"): lambda: MembershipAttribute(
                   column, values, ThresholdAttack("loss"), positive=1.0),
               ("membership (loss threshold)", "label_only"): lambda: MembershipAttribute(
                   column, values, ThresholdAttack("loss", output=label_only), positive=1.0)}
    rows: Rows = []
    for (name, output), build in attacks.items():
        counts = {key: [0, 0] for key in ("accuracy", "reference_accuracy", "members_accuracy",
                                          "members_reference_accuracy")}
        for cut, model in zip(cuts, targets):
            records = np.concatenate([cut.train, cut.test])
            members = np.arange(len(records)) < len(cut.train)
            target = CallableTarget(lambda X, model=model: models.predict_proba(model, X), 2,
                                    output=full if output == "full" else label_only)
            metrics = build().run(target, T[records], labels[records], T[cut.aux], labels[cut.aux],
                                  truth=T[records, column], members=members).metrics
            for key, tally in counts.items():
                n = int(members.sum()) if key.startswith("members") else len(records)
                tally[0] += metrics[key] * n
                tally[1] += n
        row: dict[str, object] = {"attack": name, "output": output}
        for key, (hits, n) in counts.items():
            low, high = clopper_pearson(hits, n)
            row[key] = f"{hits / n:.3f} [{low:.3f}, {high:.3f}]"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="sections to run")
    args = parser.parse_args(argv)
    for name in args.only or SECTIONS:
        print_table(name, SECTIONS[name](args.quick))


if __name__ == "__main__":
    main()
