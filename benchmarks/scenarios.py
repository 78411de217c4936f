"""The benchmark grid: defence configurations x attacks, and what each attack is given.

A ``Defence`` is either served (output defences and monitoring, through the real ``GuardMiddleware``)
or trained in (DP-SGD). An ``AttackSpec`` builds an attack for one defence, as an adaptive attacker
would: it is told the API's public output format (``Defence.public_format``), never the defence's code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from attacks.attribute import LearnedAttribute, MembershipAttribute
from attacks.base import AttackResult
from attacks.ensemble import Architecture, Ensemble, TrainingConfig
from attacks.equivalent import FunctionallyEquivalent
from attacks.extraction import Copycat, EquationSolving, JacobianAugmentation, Knockoff
from attacks.inversion import InverseModel, MAPAttribute, MAPAttributeLabelOnly, MIFace, MIFaceBlackBox
from attacks.membership import RMIA, LabelOnlyAttack, LiRA, ShadowModelAttack, ThresholdAttack
from attacks.scoring import Judge
from attacks.hopskipjump import HopSkipJump
from attacks.observations import (AveragedNoise, HopSkipJumpDistance, InvertedReverseSigmoid, LabelRobustness,
                                  RoundedInterval, Statistic, observe)
from attacks.targets import OutputFormat, Target, TorchTarget
from attacks.undoing import UndoneTarget, averaging, inverting_reverse_sigmoid
from benchmarks.datasets import Dataset, Split
from guard.dp import default_delta
from guard.dp.audit import membership_epsilon
from guard.outputs import read_spec


@dataclass(frozen=True)
class Defence:
    """One configuration of the guard: output specs, monitoring, or DP-SGD training at ``dp_epsilon``;
    ``dp_public``: DP-SGD fine-tunes a model pretrained on the split's auxiliary part, which is public in
    the bench's threat model (``guard.dp.public``; ``guard train-dp --public``)."""

    name: str
    output: tuple[str, ...] = ()
    monitoring: bool = False
    dp_epsilon: float | None = None
    dp_public: bool = False

    @property
    def public_format(self) -> OutputFormat:
        """What an attacker learns of the output format from the answers themselves. Noise and
        reverse sigmoid look like full probabilities: the attacker cannot mimic them."""
        rounding = top_k = None
        label_only = False
        for spec in self.output:
            kind, arguments = read_spec(spec)
            if kind == "round":
                rounding = arguments[0]
            elif kind == "top_k":
                top_k = arguments[0]
            elif kind == "label_only":
                label_only = True
        return OutputFormat(rounding=rounding, top_k=top_k, label_only=label_only)


WATERMARK_RATE = 0.005
"""The watermark rate of the bench's watermark defences: DAWN's (its reference code's 5/1000)."""


def watermark_defences(rate: float = WATERMARK_RATE) -> tuple[Defence, ...]:
    """The watermark alone and combined with rounding and with label-only answers (named
    ``watermark...`` at ``WATERMARK_RATE``, ``watermark:R...`` at another rate)."""
    mark = f"watermark:{rate:g}"
    name = "watermark" if rate == WATERMARK_RATE else mark
    return (Defence(name, (mark,)), Defence(f"{name}+round:2", (mark, "round:2")),
            Defence(f"{name}+label_only", (mark, "label_only")))


DEFENCES: dict[str, Defence] = {d.name: d for d in (
    Defence("none"),
    Defence("round:2", ("round:2",)),
    Defence("round:1", ("round:1",)),
    Defence("top_k:1", ("top_k:1",)),
    Defence("label_only", ("label_only",)),
    Defence("noise", ("noise:0.5",)),
    Defence("reverse_sigmoid", ("reverse_sigmoid:0.7:0.4",)),
    Defence("monitoring", monitoring=True),
    Defence("dp-eps1", dp_epsilon=1.0),
    Defence("dp-eps8", dp_epsilon=8.0),
    Defence("dp-eps8-public", dp_epsilon=8.0, dp_public=True),
    *watermark_defences(),
)}


def memo() -> Callable[[tuple, Callable[[], Any]], Any]:
    """An in-memory ``Context.shared``: ``make()`` once per key."""
    made: dict[tuple, Any] = {}

    def shared(key: tuple, make: Callable[[], Any]) -> Any:
        if key not in made:
            made[key] = make()
        return made[key]
    return shared


@dataclass
class Context:
    """Everything an attack may be given in one (dataset, model, defence, seed) cell.

    ``split.train`` are the target's members; ``split.test`` held out; ``split.aux`` the attacker's own
    data. ``model`` is the (possibly DP-trained) torch model, for white-box attacks only (None when
    auditing an endpoint). ``labels_of`` gives the raw model's labels, against which fidelity is
    measured outside the attacker's query count. ``evaluator`` is an independent classifier (trained
    on data the target never saw) that judges reconstructions."""

    dataset: Dataset
    split: Split
    model_kind: str
    hidden: int
    training: TrainingConfig
    defence: Defence
    seed: int
    quick: bool
    model: Any
    labels_of: Callable[[np.ndarray], np.ndarray]
    evaluator: Callable[[np.ndarray], np.ndarray]
    sensitive: tuple[int, np.ndarray] | None = None  # (column, values) of a sensitive attribute
    activation: str = "relu"  # the target MLP's hidden activation (what the attacker's own copies use)
    detectors: dict[str, dict[str, Any]] | None = None  # calibrated detector settings, with monitoring
    # makes attacker-side models once per key for every cell of a target (on the bench: benchmarks.cache)
    shared: Callable[[tuple, Callable[[], Any]], Any] = field(default_factory=memo)

    def reuse(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` once per key: e.g. LiRA's reference models, which depend only on the attacker's
        data and so serve every defence of a (dataset, model, seed)."""
        return self.shared((self.dataset.name, self.model_kind, self.seed, *key), make)

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.model_kind, self.hidden, self.activation)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        index = getattr(self.split, name)
        return self.dataset.X[index].astype(np.float64), self.dataset.y[index]

    def candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Membership candidates in the LiRA game (Carlini et al. 2022, sec. V-A): the target was
        trained on a random half of the dataset and every record is a candidate (members: the train
        part; non-members: test and auxiliary parts), shuffled. With every record in play a 1% FPR
        rests on about 9 non-members on digits rather than 4, and the online references see each
        candidate IN and OUT."""
        index = np.concatenate([self.split.train, self.split.test, self.split.aux])
        is_member = np.arange(len(index)) < len(self.split.train)
        order = self._candidate_order()
        return self.dataset.X[index[order]].astype(np.float64), self.dataset.y[index[order]], is_member[order]

    def population_in_candidates(self) -> np.ndarray:
        """Where the attacker's population (the auxiliary part) lies among ``candidates()``."""
        return np.flatnonzero(self._candidate_order() >= len(self.split.train) + len(self.split.test))

    def _candidate_order(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(len(self.split.train) + len(self.split.test)
                                                            + len(self.split.aux))


@dataclass(frozen=True)
class AttackSpec:
    """One row kind of the grid: ``run(target, context)`` attacks, ``applies(context)`` says when it
    makes sense; ``primary`` names the success metric and ``chance(context)`` its value for an
    attacker who learns nothing. ``adapts`` names the attack this one adapts to a defence's output
    format (rounding-aware LiRA adapts ``lira-online``): verdicts compare it with that attack undefended."""

    name: str
    family: str
    primary: str
    run: Callable[[Target, Context], AttackResult]
    chance: Callable[[Context], float]
    applies: Callable[[Context], bool] = lambda context: True
    requires: Callable[[Context], str] = lambda context: ""  # why the data set cannot support it, or ""
    adaptive: Callable[[Context], bool] = lambda context: False
    white_box: bool = False
    tags: tuple[str, ...] = field(default=())
    adapts: str | None = None


def _majority_agreement(context: Context) -> float:
    """Agreement of a constant copy that always answers the commonest test label."""
    _, y = context.part("test")
    return float(np.bincount(y).max() / len(y))


def _is_image(context: Context) -> bool:
    return context.dataset.image_shape is not None


def _rounds(context: Context) -> bool:
    return context.defence.public_format.rounding is not None


def _knows_format(context: Context) -> bool:
    return context.defence.public_format != OutputFormat()


def _equation_solving(rounding_aware: bool) -> Callable[[Target, Context], AttackResult]:
    def run(target: Target, context: Context) -> AttackResult:
        X_test, y_test = context.part("test")
        hidden = context.hidden if context.model_kind == "mlp" else None
        rounding = context.defence.public_format.rounding if rounding_aware else None
        # 300 L-BFGS iterations (and, for an MLP, one start), to bound the grid's run time: digits MLP
        # 0.92 test agreement in 3 s against 0.94 in 25 s with 2 starts; the rounding-aware softmax
        # copy agrees as well after 300 iterations as after 2000 (0.72-0.89 round:1, 0.95 round:2).
        options = {"max_iter": 300} if hidden is None else {"restarts": 1, "max_iter": 300}
        return EquationSolving(hidden, rounding=rounding, seed=context.seed, **options).run(
            target, X_test, y_test, oracle=context.labels_of)
    return run


def _functionally_equivalent(target: Target, context: Context) -> AttackResult:
    """Jagielski et al.'s extraction of the ReLU MLP, its segments between the attacker's own records."""
    X_test, y_test = context.part("test")
    aux, _ = context.part("aux")
    return FunctionallyEquivalent(context.hidden, seed=context.seed).run(target, X_test, y_test, aux=aux,
                                                                         oracle=context.labels_of)


def _learning(build: Callable[[Context], Any]) -> Callable[[Target, Context], AttackResult]:
    """Copycat, Knockoff and Jacobian augmentation, from the attacker's auxiliary pool."""
    def run(target: Target, context: Context) -> AttackResult:
        X_test, y_test = context.part("test")
        aux, _ = context.part("aux")
        return build(context).run(target, X_test, y_test, aux=aux, oracle=context.labels_of)
    return run


def _copy_options(context: Context) -> dict[str, Any]:
    return {"hidden": context.hidden if context.model_kind == "mlp" else None,
            "epochs": 60 if context.quick else 100, "seed": context.seed}


def _membership(build: Callable[[Context], Any], population: bool) -> Callable[[Target, Context], AttackResult]:
    def run(target: Target, context: Context) -> AttackResult:
        X, y, is_member = context.candidates()
        extra = {"population": context.part("aux")} if population else {}
        return _with_epsilon_bound(build(context).run(target, X, y, is_member=is_member, **extra), is_member, context)
    return run


def _with_epsilon_bound(result: AttackResult, is_member: np.ndarray, context: Context) -> AttackResult:
    """``result`` with the epsilon its ROC proves (``guard.dp.audit.membership_epsilon``, 95% confidence) at
    the delta DP-SGD targets train with: the black-box audit of a DP row."""
    delta = default_delta(len(context.split.train))
    result.metrics["epsilon_lower_bound"] = membership_epsilon(result.artefacts["scores"], is_member, delta)
    return result


def _references(context: Context) -> int:
    return 16 if context.quick else 32


def _lira(offline: bool, statistic: Callable[[Context], Statistic | None] = lambda c: None) -> Callable[[Target, Context], AttackResult]:
    """LiRA with the references shared by every defence of the cell's target; ``statistic`` reads
    the defended answers (default: as published, in the public format)."""
    def run(target: Target, context: Context) -> AttackResult:
        X, y, is_member = context.candidates()
        attack = LiRA(_references(context), offline=offline, architecture=context.architecture,
                      training=context.training, image_shape=context.dataset.image_shape,
                      output=context.defence.public_format, statistic=statistic(context),
                      seed=context.seed)
        references = _shared_references(context, X, y)
        return _with_epsilon_bound(attack.run(target, X, y, is_member=is_member, references=references), is_member,
                                   context)
    return run


def _shared_references(context: Context, X: np.ndarray, y: np.ndarray) -> Ensemble:
    """LiRA's reference models of the cell's target (random halves of the candidates), trained once and
    shared by every defence and by RMIA."""
    lira = LiRA(_references(context), architecture=context.architecture, training=context.training,
                seed=context.seed)
    return context.reuse(("lira", lira.n_references), lambda: lira.train_references(X, y, context.dataset.n_classes))


def _rmia(offline: bool) -> Callable[[Target, Context], AttackResult]:
    """RMIA on LiRA's references (shared by every defence of the cell's target), its population
    records z the attacker's auxiliary part, which lies among the candidates; offline, each
    candidate's OUT references (half of them)."""
    def run(target: Target, context: Context) -> AttackResult:
        X, y, is_member = context.candidates()
        attack = RMIA(_references(context), offline=offline, architecture=context.architecture,
                      training=context.training, output=context.defence.public_format, seed=context.seed)
        result = attack.run(target, X, y, z_index=context.population_in_candidates(), is_member=is_member,
                            references=_shared_references(context, X, y))
        return _with_epsilon_bound(result, is_member, context)
    return run


THREAT_MODELS = {
    "extraction": "The attacker queries the API with its own data (the auxiliary part, same distribution, "
                  "never the target's training set). No-model reference: a constant copy answering the "
                  "commonest test label (its agreement is the 'chance' column).",
    "membership": "The LiRA game (Carlini et al. 2022): the target trains on a random half of the data, every "
                  "record is a candidate; the attacker's population is the auxiliary part. No-model "
                  "reference: guessing, TPR = FPR (1% at 1% FPR).",
    "inversion": "The attacker inverts the people (classes) of a seeded half of the classes, the victims, and "
                 "its auxiliary data are records of the other classes only (other people, Fredrikson et al. "
                 "2015), unless the row says 'shared-classes'. Reconstructions are judged against held-out "
                 "records of the victims that no attack saw (identification by a classifier of standardised "
                 "images, 5-way line-up, SSIM, MSE). No-model reference: the reconstruction from the label "
                 "alone (the auxiliary mean of the label's class if the attacker holds it, else of all its "
                 "data), judged the same way; verdicts are on the advantage over it.",
    "ownership": "Nothing stops the copier; the API watermarks its answers (DAWN, Szyller et al. 2021) and keeps "
                 "the records. Each extraction attack's copy is tested as DAWN proposes (here Fisher's exact test of its "
                 "agreement with watermark labels against control labels, alpha 1e-6); adaptive copiers know the "
                 "scheme and r. No-model reference: 54 independent models (3 architectures, trained on the owner's "
                 "data and on the attacker's own labelled data) tested against the same records must not be "
                 "accused.",
    "attribute": "The attacker knows a record's other attributes and its label, and queries the model once per "
                 "value of the hidden attribute (Fredrikson et al. 2014, 2015); the learned attack also queries it "
                 "so on its own records to train its attack model, the membership-based one scores each "
                 "completion with a membership attack (Yeom et al. 2018). No-model reference: the best "
                 "predictor of the attribute trained on the attacker's own data (prior's mode, logistic "
                 "regression or random forest, by cross-validation); verdicts are on the advantage over it.",
}
"""The threat model and no-model reference of each attack family, stated in the report."""

MI_FACE_PROCESS = None
"""MI-Face's Process step on the bench: clipping to the pixel box only. Measured on faces (softmax,
seed 0, 20 victims, 1000 iterations from the other people's mean face; no-model reference line-up
0.21, SSIM 0.51): clipping reaches line-up 0.965 and SSIM 0.64; Gaussian denoising (0.5 px) then
unsharp masking 0.40 and 0.33 (bright blobs, no face); denoising alone 0.56 and 0.43 (blur).
``python -m benchmarks.perf.mi_face`` repeats the measurement."""


@dataclass(frozen=True)
class InversionSetting:
    """One cell's inversion threat model: the victim ``classes``, the attacker's auxiliary records
    ``aux_X``/``aux_y``, the ``judge`` (held-out test records of the victims) and, per class, the
    no-model reference reconstruction."""

    classes: np.ndarray
    aux_X: np.ndarray
    aux_y: np.ndarray
    judge: Judge

    def reference(self, labels: np.ndarray) -> np.ndarray:
        """What the attacker reconstructs from the label alone: the mean of its own records of that
        class if it has any, else the mean of all its records."""
        overall = self.aux_X.mean(axis=0)
        return np.stack([self.aux_X[self.aux_y == label].mean(axis=0) if (self.aux_y == label).any()
                         else overall for label in labels])

    def photos(self, labels: np.ndarray) -> np.ndarray:
        """One of the judge's held-out photos of each label's person."""
        return np.stack([self.judge.photos[self.judge.labels == label][0] for label in labels])

    def measures(self, reconstructions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The judge's measures of ``reconstructions`` beside the no-model reference's
        (``reference_*``) and the advantage over it (``advantage_*``, higher = more leakage)."""
        attack = self.judge.measures(reconstructions, labels)
        reference = self.judge.measures(self.reference(labels), labels)
        metrics = {**attack, **{f"reference_{name}": value for name, value in reference.items()}}
        for name, value in attack.items():
            metrics[f"advantage_{name}"] = reference[name] - value if name == "mse" else value - reference[name]
        return metrics

    def judged(self, result: AttackResult, labels: np.ndarray) -> AttackResult:
        """``result`` with the judge's ``measures`` of its reconstructions of ``labels`` and, for the
        verdict's bootstrap over victims, each reconstruction's advantage in line-up accuracy over the
        no-model reference's (``samples``)."""
        reconstructions = result.artefacts["reconstructions"]
        result.metrics.update(self.measures(reconstructions, labels))
        gain = self.judge.lineup_hits(reconstructions, labels) - self.judge.lineup_hits(self.reference(labels), labels)
        result.artefacts["samples"] = {"advantage_lineup_accuracy": gain, "victims": np.asarray(labels)}
        return result


def inversion_setting(context: Context, shared_classes: bool = False) -> InversionSetting:
    """The inversion threat model of ``context`` (see ``THREAT_MODELS``): victims are a seeded half
    of the classes (of those with held-out test records, which the judge needs); the attacker holds every record of the other classes, or with ``shared_classes``
    its auxiliary part of the split (all classes)."""
    def make() -> InversionSetting:
        dataset = context.dataset
        X_test, y_test = context.part("test")
        judged = np.unique(y_test)  # victims need held-out records for the judge
        classes = np.sort(np.random.default_rng(context.seed).permutation(judged)[: max(2, len(judged) // 2)])
        if shared_classes:
            aux_X, aux_y = context.part("aux")
        else:
            others = ~np.isin(dataset.y, classes)
            aux_X, aux_y = dataset.X[others].astype(np.float64), dataset.y[others]
        victims = np.isin(y_test, classes)
        judge = Judge(X_test[victims], y_test[victims], dataset.image_shape, seed=context.seed)
        return InversionSetting(classes, aux_X, aux_y, judge)
    return context.reuse(("inversion", shared_classes), make)


BLACKBOX_VICTIMS = 10
"""How many victims black-box MI-Face inverts (each costs ``(2 * directions + 1)`` queries a step)."""


def defence_arguments(defence: Defence, kind: str) -> tuple[float, ...] | None:
    """The public parameters of the defence's ``kind`` stage (e.g. ``reverse_sigmoid`` -> (beta, gamma)),
    or None if it has none: what the adaptive attacker is told (Kerckhoffs), never the secret."""
    for spec in defence.output:
        name, arguments = read_spec(spec)
        if name == kind:
            return tuple(float(argument) for argument in arguments)
    return None


def _reveals_label_only(context: Context) -> bool:
    output = context.defence.public_format
    return output.label_only or output.top_k == 1


def _label_robustness(context: Context) -> Statistic:
    return LabelRobustness(16 if context.quick else 32, sigma=0.1, seed=context.seed)


def _hopskipjump_distance(context: Context) -> Statistic:
    """Li & Zhang's decision-boundary attack, HopSkipJump with 300 label queries per candidate (150 quick),
    calibrated per example: on the digits MLP (3 seeds, 32 references) its TPR at 1% FPR is 0.052 against 0.062
    for 32-copy noise robustness (``python -m benchmarks.perf.attacks --only label-only-boundary``)."""
    return HopSkipJumpDistance(HopSkipJump(max_queries=150 if context.quick else 300, initial_samples=25,
                                           seed=context.seed))


def _averaged_noise(context: Context) -> Statistic:
    return AveragedNoise(defence_arguments(context.defence, "noise")[0], repeats=16 if context.quick else 32,
                         seed=context.seed)


def _inverted_reverse_sigmoid(context: Context) -> Statistic:
    """The attacker knows the defence is a reverse sigmoid, not its beta and gamma: it estimates them
    from its answers (``attacks.reverse_sigmoid.estimate_reverse_sigmoid``)."""
    return InvertedReverseSigmoid(seed=context.seed)


def _mi_face_run(white_box: bool) -> Callable[[Target, Context], AttackResult]:
    """MI-Face from the other people's mean face (the no-model reference, so every gain is the
    model's), Process ``MI_FACE_PROCESS``; black-box with tiled probes on images of 32 pixels or more."""
    def run(target: Target, context: Context) -> AttackResult:
        setting = inversion_setting(context)
        shape = context.dataset.image_shape
        start = setting.aux_X.mean(axis=0)
        if white_box:
            target = TorchTarget(context.model, context.dataset.n_classes)
            labels = setting.classes
            attack = MIFace(alpha=500 if context.quick else 1000, process=MI_FACE_PROCESS, start=start)
        else:
            labels = setting.classes[:BLACKBOX_VICTIMS]
            attack = MIFaceBlackBox(alpha=100 if context.quick else 150, beta=30, process=MI_FACE_PROCESS,
                                    start=start, image_shape=shape, coarse=4 if min(shape[:2]) >= 32 else 1,
                                    output=context.defence.public_format, seed=context.seed)
        result = attack.run(target, context.dataset.n_features, labels=labels)
        setting.judged(result, labels)
        result.artefacts["images"] = {"victims' held-out photos": setting.photos(labels),
                                      "no-model reference": setting.reference(labels)}
        return result
    return run


def _inverse_model(shared_classes: bool, undo: Callable[[Target, Context], UndoneTarget] | None = None
                   ) -> Callable[[Target, Context], AttackResult]:
    """The inverse model trained on the attacker's auxiliary records, applied to the answers for the
    victims' training records (the first 200); with ``undo``, every answer is read with the defence
    undone first (the adaptive attacker), and what the undoing learnt is reported."""
    def run(target: Target, context: Context) -> AttackResult:
        setting = inversion_setting(context, shared_classes)
        X, y = context.part("train")
        victims = np.isin(y, setting.classes)
        victims_X, victims_y = X[victims][:200], y[victims][:200]
        attack = InverseModel(epochs=60 if context.quick else 150, output=context.defence.public_format,
                              seed=context.seed)
        seen = target if undo is None else undo(target, context)
        observed = observe(seen, victims_X, context.defence.public_format)
        result = attack.run(seen, setting.aux_X, observed, victims_X, victims_y)
        setting.judged(result, victims_y)
        if undo is not None:
            result.metrics.update(seen.learnt)
        result.artefacts["images"] = {"victims' inputs": victims_X, "no-model reference": setting.reference(victims_y)}
        return result
    return run


def _inverted_answers(target: Target, context: Context) -> UndoneTarget:
    """Reverse-sigmoid answers inverted with beta and gamma estimated from the answers (no reference
    model: the inversion attacker's data hold none of the victims' classes)."""
    return inverting_reverse_sigmoid(target, seed=context.seed)


def _averaged_answers(target: Target, context: Context) -> UndoneTarget:
    return averaging(target, repeats=16 if context.quick else 32)


def _attribute(build: Callable[[Context, int, np.ndarray], Any]) -> Callable[[Target, Context], AttackResult]:
    """An attribute-inference attack ``build(context, column, values)`` on the target's training and test
    records (members and non-members), with the attacker's auxiliary records."""
    def run(target: Target, context: Context) -> AttackResult:
        column, values = context.sensitive
        records, labels = context.part("train")
        test_records, test_labels = context.part("test")
        aux_X, aux_y = context.part("aux")
        X = np.concatenate([records, test_records])
        y = np.concatenate([labels, test_labels])
        members = np.concatenate([np.ones(len(labels), bool), np.zeros(len(test_labels), bool)])
        attack = build(context, column, values)
        return attack.run(target, X, y, aux_X, aux_y, truth=X[:, column].copy(), members=members)
    return run


def _prior_accuracy(context: Context) -> float:
    column, values = context.sensitive
    aux_X, _ = context.part("aux")
    codes = np.abs(aux_X[:, column, None] - values).argmin(axis=1)
    return float(np.bincount(codes, minlength=len(values)).max() / len(codes))


def _needs_images(context: Context) -> str:
    return "" if _is_image(context) else (f"{context.dataset.name} holds no images: inversion needs image-shaped "
                                          "records (an NPZ array (n, h, w) or an 'image_shape' entry)")


def _needs_sensitive(context: Context) -> str:
    return "" if context.sensitive is not None else (
        f"{context.dataset.name} names no sensitive attribute: pass --sensitive COLUMN (a discrete column)")


ATTACK_SPECS: dict[str, AttackSpec] = {s.name: s for s in (
    AttackSpec("equation-solving", "extraction", "agreement_test", _equation_solving(False), _majority_agreement,
               applies=lambda c: c.model_kind == "softmax" or not c.quick),
    AttackSpec("equation-solving-rounding-aware", "extraction", "agreement_test", _equation_solving(True),
               _majority_agreement, applies=lambda c: _rounds(c) and (c.model_kind == "softmax" or not c.quick),
               adaptive=_rounds, adapts="equation-solving"),
    AttackSpec("functionally-equivalent", "extraction", "agreement_test", _functionally_equivalent,
               _majority_agreement, applies=lambda c: c.model_kind == "mlp" and c.activation == "relu"),
    AttackSpec("copycat", "extraction", "agreement_test",
               _learning(lambda c: Copycat(labels_only=True, **_copy_options(c))), _majority_agreement),
    AttackSpec("copycat-k-center", "extraction", "agreement_test",
               _learning(lambda c: Copycat(labels_only=True, selection="k-center",
                                           **{**_copy_options(c), "curve_points": None})), _majority_agreement),
    AttackSpec("knockoff-adaptive", "extraction", "agreement_test",
               _learning(lambda c: Knockoff("adaptive", labels_only=c.defence.public_format.label_only,
                                            **_copy_options(c))), _majority_agreement, adaptive=_knows_format),
    AttackSpec("jacobian", "extraction", "agreement_test",
               _learning(lambda c: JacobianAugmentation(labels_only=True, **_copy_options(c))),
               _majority_agreement),
    AttackSpec("threshold", "membership", "tpr_at_1pct_fpr",
               _membership(lambda c: ThresholdAttack("loss", output=c.defence.public_format), False),
               lambda c: 0.01, adaptive=_knows_format),
    AttackSpec("shadow", "membership", "tpr_at_1pct_fpr",
               _membership(lambda c: ShadowModelAttack(_references(c) // 2, architecture=c.architecture,
                                                       training=c.training, output=c.defence.public_format,
                                                       seed=c.seed), True),
               lambda c: 0.01, adaptive=_knows_format),
    AttackSpec("lira-online", "membership", "tpr_at_1pct_fpr", _lira(False),
               lambda c: 0.01, applies=lambda c: not c.defence.public_format.label_only, adaptive=_knows_format),
    AttackSpec("lira-offline", "membership", "tpr_at_1pct_fpr", _lira(True),
               lambda c: 0.01, applies=lambda c: not c.defence.public_format.label_only, adaptive=_knows_format),
    AttackSpec("rmia-online", "membership", "tpr_at_1pct_fpr", _rmia(False),
               lambda c: 0.01, applies=lambda c: not c.defence.public_format.label_only, adaptive=_knows_format),
    AttackSpec("rmia-offline", "membership", "tpr_at_1pct_fpr", _rmia(True),
               lambda c: 0.01, applies=lambda c: not c.defence.public_format.label_only, adaptive=_knows_format),
    AttackSpec("lira-rounding-aware", "membership", "tpr_at_1pct_fpr",
               _lira(False, lambda c: RoundedInterval(c.defence.public_format.rounding)), lambda c: 0.01,
               applies=lambda c: _rounds(c) and not _reveals_label_only(c), adaptive=lambda c: True, adapts="lira-online"),
    AttackSpec("lira-inverted-reverse-sigmoid", "membership", "tpr_at_1pct_fpr",
               _lira(False, _inverted_reverse_sigmoid), lambda c: 0.01,
               applies=lambda c: defence_arguments(c.defence, "reverse_sigmoid") is not None,
               adaptive=lambda c: True, adapts="lira-online"),
    AttackSpec("lira-averaged-noise", "membership", "tpr_at_1pct_fpr", _lira(False, _averaged_noise),
               lambda c: 0.01, applies=lambda c: defence_arguments(c.defence, "noise") is not None,
               adaptive=lambda c: True, adapts="lira-online"),
    AttackSpec("label-only-calibrated", "membership", "tpr_at_1pct_fpr",
               _lira(False, _label_robustness), lambda c: 0.01, applies=_reveals_label_only,
               adaptive=lambda c: True, adapts="lira-online"),
    AttackSpec("label-only-calibrated-offline", "membership", "tpr_at_1pct_fpr",
               _lira(True, _label_robustness), lambda c: 0.01, applies=_reveals_label_only,
               adaptive=lambda c: True, adapts="lira-offline"),
    AttackSpec("label-only-hopskipjump-calibrated", "membership", "tpr_at_1pct_fpr",
               _lira(False, _hopskipjump_distance), lambda c: 0.01, applies=_reveals_label_only,
               adaptive=lambda c: True, adapts="lira-online"),
    AttackSpec("label-only", "membership", "tpr_at_1pct_fpr",
               _membership(lambda c: LabelOnlyAttack("augmentation" if _is_image(c) else "noise",
                                                     image_shape=c.dataset.image_shape, seed=c.seed), False),
               lambda c: 0.01, adaptive=lambda c: c.defence.public_format.label_only),
    AttackSpec("mi-face", "inversion", "lineup_accuracy", _mi_face_run(True), lambda c: 0.2,
               applies=lambda c: _is_image(c) and c.model is not None
               and (c.defence.name == "none" or c.defence.dp_epsilon is not None),
               requires=_needs_images, white_box=True),
    AttackSpec("mi-face-blackbox", "inversion", "lineup_accuracy", _mi_face_run(False), lambda c: 0.2,
               applies=lambda c: _is_image(c) and not c.defence.public_format.label_only,
               requires=_needs_images, adaptive=_rounds),
    AttackSpec("inverse-model", "inversion", "lineup_accuracy", _inverse_model(False), lambda c: 0.2,
               applies=_is_image, requires=_needs_images, adaptive=_knows_format),
    AttackSpec("inverse-model-shared-classes", "inversion", "lineup_accuracy", _inverse_model(True),
               lambda c: 0.2, applies=_is_image, requires=_needs_images, adaptive=_knows_format),
    AttackSpec("inverse-model-inverted-reverse-sigmoid", "inversion", "lineup_accuracy",
               _inverse_model(False, _inverted_answers), lambda c: 0.2,
               applies=lambda c: _is_image(c) and defence_arguments(c.defence, "reverse_sigmoid") is not None,
               requires=_needs_images, adaptive=lambda c: True, adapts="inverse-model"),
    AttackSpec("inverse-model-averaged-noise", "inversion", "lineup_accuracy", _inverse_model(False, _averaged_answers),
               lambda c: 0.2, applies=lambda c: _is_image(c) and defence_arguments(c.defence, "noise") is not None,
               requires=_needs_images, adaptive=lambda c: True, adapts="inverse-model"),
    AttackSpec("map-attribute", "attribute", "accuracy",
               _attribute(lambda c, column, values: MAPAttribute(column, values, positive=float(values[-1]),
                                                                 seed=c.seed)), _prior_accuracy,
               applies=lambda c: c.sensitive is not None and not c.defence.public_format.label_only,
               requires=_needs_sensitive, adaptive=_knows_format),
    AttackSpec("map-attribute-label-only", "attribute", "accuracy",
               _attribute(lambda c, column, values: MAPAttributeLabelOnly(column, values, positive=float(values[-1]),
                                                                          seed=c.seed)), _prior_accuracy,
               applies=lambda c: c.sensitive is not None, requires=_needs_sensitive,
               adaptive=lambda c: c.defence.public_format.label_only, adapts="map-attribute"),
    AttackSpec("learned-attribute", "attribute", "accuracy",
               _attribute(lambda c, column, values: LearnedAttribute(column, values, positive=float(values[-1]),
                                                                     seed=c.seed)), _prior_accuracy,
               applies=lambda c: c.sensitive is not None, requires=_needs_sensitive, adaptive=_knows_format),
    AttackSpec("membership-attribute", "attribute", "accuracy",
               _attribute(lambda c, column, values: MembershipAttribute(
                   column, values, ThresholdAttack("loss", output=c.defence.public_format),
                   positive=float(values[-1]), seed=c.seed)), _prior_accuracy,
               applies=lambda c: c.sensitive is not None, requires=_needs_sensitive, adaptive=_knows_format),
)}
