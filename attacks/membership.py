"""Membership inference: was this record in the target's training set?

Five attacks, each scoring every candidate (higher means "member"); when ``is_member`` is given,
``scoring.membership_measures`` turns the scores into AUC and TPR at low FPR (Carlini et al. 2022,
sec. III-B: report the low-FPR regime, not average accuracy). Each attack is told the API's public
output format (``OutputFormat``) and passes its own shadow/reference models' outputs through it.

- ``threshold``: loss or confidence threshold (Yeom et al., CSF 2018, sec. 3);
- ``shadow``: shadow models and per-class attack models (Shokri et al., S&P 2017, sec. IV-V);
- ``lira``: the likelihood-ratio attack, online and offline (Carlini et al., S&P 2022, sec. IV, Alg. 1);
- ``rmia``: the relative membership attack, online and offline (Zarifzadeh, Liu, Shokri, ICML 2024, sec. 3);
- ``label-only``: robustness to augmentation/noise and distance to the boundary
  (Choquette-Choo et al., ICML 2021, sec. 4), the boundary found by HopSkipJump (Li & Zhang, CCS 2021,
  sec. 3.3; Chen et al., S&P 2020).
"""
from __future__ import annotations

from functools import partial

import numpy as np
from scipy.special import log_ndtr

from attacks import scoring
from attacks.base import Attack, AttackResult
from attacks.ensemble import Architecture, Ensemble, TrainingConfig, random_halves, train_ensemble
from attacks.hopskipjump import HopSkipJump
from attacks.observations import (
    Published,
    Statistic,
    boundary_distances,
    labels,
    observe,
    unit_directions,
)
from attacks.targets import OutputFormat, OutputUnavailable, Target

Data = tuple[np.ndarray, np.ndarray]


def as_published(probabilities: np.ndarray, output: OutputFormat) -> np.ndarray:
    """Pass ``(..., n, k)`` model outputs through the API's public format (the adaptive attacker)."""
    shape = probabilities.shape
    return output.apply(probabilities.reshape(-1, shape[-1])).reshape(shape)


def translations(X: np.ndarray, image_shape: tuple[int, int], max_shift: int) -> np.ndarray:
    """``(views, n, d)``: every image shifted by up to ``max_shift`` pixels in each direction, the
    uncovered border filled with 0 (the identity first)."""
    h, w = image_shape
    images = np.asarray(X).reshape(len(X), h, w)
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    shifts = [(0, 0)] + [(dy, dx) for dy in range(-max_shift, max_shift + 1)
                         for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
    views = [padded[:, max_shift + dy: max_shift + dy + h, max_shift + dx: max_shift + dx + w]
             for dy, dx in shifts]
    return np.stack(views).reshape(len(shifts), len(X), h * w)


class ThresholdAttack(Attack):
    """Yeom et al. 2018, sec. 3: a member has low loss (``criterion="loss"``, needs the true label) or
    high top confidence (``"confidence"``). Against labels only both become the correctness of the
    predicted label (Yeom's bounded-loss attack, the "gap attack")."""

    name = "threshold"

    def __init__(self, criterion: str = "loss", output: OutputFormat = OutputFormat()):
        if criterion not in ("loss", "confidence"):
            raise ValueError(f"criterion must be 'loss' or 'confidence', got {criterion!r}")
        self.criterion = criterion
        self.output = output

    def run(self, target: Target, X: np.ndarray, y: np.ndarray, *,
            is_member: np.ndarray | None = None) -> AttackResult:
        start = target.queries
        answers = observe(target, X, self.output)
        if self.output.label_only or not target.returns_probabilities:
            scores = (answers.argmax(axis=1) == y).astype(float)
        elif self.criterion == "loss":
            scores = np.log(np.maximum(answers[np.arange(len(y)), y], 1e-300))
        else:
            scores = answers.max(axis=1)
        return _result(self.name, scores, is_member, target.queries - start)


class ShadowModelAttack(Attack):
    """Shokri et al. 2017, sec. IV-V: ``n_shadows`` models trained like the target on disjoint IN/OUT
    halves of the attacker's ``population``; their (published) output vectors on IN and OUT records,
    split by true class, train one binary attack model per class; a candidate's score is the attack
    model of its class applied to the target's output vector (unsorted, as in the paper)."""

    name = "shadow"

    def __init__(self, n_shadows: int = 8, shadow_size: int | None = None,
                 architecture: Architecture = Architecture(), training: TrainingConfig = TrainingConfig(),
                 attack_architecture: Architecture = Architecture("mlp", hidden=64),
                 attack_training: TrainingConfig = TrainingConfig(epochs=30),
                 output: OutputFormat = OutputFormat(), seed: int = 0):
        self.n_shadows = n_shadows
        self.shadow_size = shadow_size
        self.architecture = architecture
        self.training = training
        self.attack_architecture = attack_architecture
        self.attack_training = attack_training
        self.output = output
        self.seed = seed

    def run(self, target: Target, X: np.ndarray, y: np.ndarray, *, population: Data,
            is_member: np.ndarray | None = None) -> AttackResult:
        X_pop, y_pop = population
        size = self.shadow_size or len(y_pop) // 2
        if 2 * size > len(y_pop):
            raise ValueError(f"shadow_size {size} needs {2 * size} population records, got {len(y_pop)}")
        rng = np.random.default_rng(self.seed)
        order = np.stack([rng.permutation(len(y_pop))[: 2 * size] for _ in range(self.n_shadows)])
        masks = np.zeros((self.n_shadows, len(y_pop)), dtype=bool)
        np.put_along_axis(masks, order[:, :size], True, axis=1)
        k = target.n_classes
        shadows = train_ensemble(X_pop, y_pop, masks, k, architecture=self.architecture,
                                 config=self.training, seed=self.seed)
        outputs = as_published(shadows.predict_proba(X_pop), self.output)
        rows = outputs[np.arange(self.n_shadows)[:, None], order].reshape(-1, k)
        classes = y_pop[order].reshape(-1)
        labels = np.tile(np.arange(2 * size) < size, self.n_shadows).astype(np.int64)
        per_class = classes[None] == np.arange(k)[:, None]
        per_class[~per_class.any(axis=1)] = True  # a class absent from the shadows' data: one model for all
        attack_models = train_ensemble(rows, labels, per_class,
                                       2, architecture=self.attack_architecture,
                                       config=self.attack_training, seed=self.seed + 1)
        start = target.queries
        answers = observe(target, X, self.output)
        logits = attack_models.logits(answers).double().numpy()[y, np.arange(len(y))]
        scores = logits[:, 1] - logits[:, 0]
        return _result(self.name, scores, is_member, target.queries - start,
                       shadows=shadows, attack_models=attack_models)


class LiRA(Attack):
    """The likelihood-ratio attack (Carlini et al. 2022, sec. IV, Alg. 1).

    ``n_references`` models mirror the target's training on random halves of the candidates plus the
    attacker's ``population``, each candidate IN for exactly half of them. For each candidate the
    statistic of its IN and OUT models is fit with Gaussians; online, the score is the log likelihood
    ratio of the target's statistic; offline (``offline=True``, OUT models only), the one-sided test
    ``-log Pr[Z >= observed]`` under the OUT Gaussian. One variance per side is pooled over all
    candidates (``global_variance``, the fixed variance of sec. VI-B) unless told otherwise: on the
    digits game it beats per-candidate variances at 1% FPR from 16 up to 256 references (mean TPR over
    6 targets 0.057 vs 0.025 with 16, 0.073 vs 0.063 with 64, 0.080 vs 0.072 with 256), each
    candidate's IN and OUT spread being too noisy to estimate from a few dozen models.
    ``image_shape`` and ``max_shift`` add shifted queries whose scores are averaged (sec. VI-C; on
    8x8 digits a one-pixel shift is a different image, and averaging lowers the TPR).

    ``statistic`` (``attacks.observations``) is how the statistic is read off a defended API: by
    default the scaled logit of the answer as published in the public ``output`` format (raises
    ``OutputUnavailable`` against labels only); the adaptive statistics invert or average the
    defence, or, against labels only, measure robustness to noise. When the statistic is an interval
    (a rounded answer) its likelihood is the Gaussian mass of the interval.
    """

    name = "lira"

    def __init__(self, n_references: int = 16, offline: bool = False, global_variance: bool = True,
                 architecture: Architecture = Architecture(), training: TrainingConfig = TrainingConfig(),
                 image_shape: tuple[int, int] | None = None, max_shift: int = 0,
                 output: OutputFormat = OutputFormat(), statistic: Statistic | None = None, seed: int = 0):
        self.n_references = n_references
        self.offline = offline
        self.global_variance = global_variance
        self.architecture = architecture
        self.training = training
        self.image_shape = image_shape
        self.max_shift = max_shift
        self.statistic = statistic if statistic is not None else Published(output)
        self.seed = seed

    def run(self, target: Target, X: np.ndarray, y: np.ndarray, *, population: Data | None = None,
            is_member: np.ndarray | None = None, references: Ensemble | None = None) -> AttackResult:
        if references is None:
            references = self.train_references(X, y, target.n_classes, population)
        elif references.masks.shape[1] != len(y) + (0 if population is None else len(population[1])):
            raise ValueError("the references were trained on a different pool of records")
        start = target.queries
        measured = self.statistic.measure(target, self._views(X), y, references)
        inside = references.masks[:, None, : len(y)]
        mean_out, std_out = self._gaussian(measured.reference, ~inside)
        if self.offline:
            scores = -log_ndtr((mean_out - measured.low) / std_out).mean(axis=0)
        else:
            mean_in, std_in = self._gaussian(measured.reference, inside)
            scores = (_log_mass(measured.low, measured.high, mean_in, std_in)
                      - _log_mass(measured.low, measured.high, mean_out, std_out)).mean(axis=0)
        return _result(self.name, scores, is_member, target.queries - start, learnt=measured.learnt,
                       references=references, mode="offline" if self.offline else "online", **measured.artefacts)

    def train_references(self, X: np.ndarray, y: np.ndarray, n_classes: int,
                         population: Data | None = None) -> Ensemble:
        """The reference models ``run`` trains: random halves of the candidates plus ``population``.
        They depend only on the attacker's data, so one set serves every target and output format."""
        X_pool, y_pool = _pooled(X, y, population)
        return train_ensemble(X_pool, y_pool, random_halves(len(y_pool), self.n_references, self.seed),
                              n_classes, architecture=self.architecture, config=self.training, seed=self.seed)

    def _views(self, X: np.ndarray) -> np.ndarray:
        if self.max_shift and self.image_shape is not None:
            return translations(X, self.image_shape, self.max_shift)
        return np.asarray(X)[None]

    def _gaussian(self, values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the models selected by ``weights``, per view and candidate;
        with ``global_variance`` each view's variance is pooled over all candidates."""
        count = weights.sum(axis=0)
        mean = (values * weights).sum(axis=0) / count
        squares = ((values - mean) ** 2 * weights).sum(axis=0)
        variance = (squares.sum(axis=1, keepdims=True) / count.sum(axis=1, keepdims=True)
                    if self.global_variance else squares / count)
        return mean, np.maximum(np.sqrt(variance), 1e-3) * np.ones_like(mean)


class RMIA(Attack):
    """The relative membership inference attack (Zarifzadeh, Liu, Shokri, ICML 2024, sec. 3, Alg. 1).

    A candidate ``x`` is compared with population records ``z`` by the pairwise likelihood ratio
    ``LR(x, z) = (Pr(x|target) / Pr(x)) / (Pr(z|target) / Pr(z))``, where ``Pr(.|model)`` is the
    model's (published) probability of the record's true label and ``Pr(.)`` its mean over the
    reference models; the score is the fraction of ``z`` with ``LR(x, z) > gamma`` (sec. 3, eq. 4-5).

    Online, ``Pr(x)`` averages every reference model (each candidate IN for half of them, as LiRA's
    references). Offline (``offline=True``) it is estimated from the OUT models only by the paper's
    linear approximation ``Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2`` (sec. 3, "offline"), and the
    same for each ``z``; ``a`` (``None``: tuned) is the value in 0, 0.1, ..., 1 with the highest AUC
    when one reference model is attacked with the others, as ML Privacy Meter tunes it, or 0.3 (its
    default) with a single reference model. Offline references train on random halves of the
    population only (every candidate OUT), so one model suffices.

    The ``z`` are the attacker's ``population`` records, or ``z_index`` (rows of the references'
    pool: the candidates, then the population) when the population is among the candidates. The
    count over a fixed set of ``z`` is monotone in ``Pr(x|target) / Pr(x)``, so on one target the
    pairwise test ranks candidates by that ratio, at the resolution of ``1 / len(z)``.
    """

    name = "rmia"
    DEFAULT_A = 0.3

    def __init__(self, n_references: int = 4, offline: bool = False, a: float | None = None, gamma: float = 1.0,
                 architecture: Architecture = Architecture(), training: TrainingConfig = TrainingConfig(),
                 output: OutputFormat = OutputFormat(), seed: int = 0):
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.n_references = n_references
        self.offline = offline
        self.a = a
        self.gamma = gamma
        self.architecture = architecture
        self.training = training
        self.output = output
        self.seed = seed

    def run(self, target: Target, X: np.ndarray, y: np.ndarray, *, population: Data | None = None,
            z_index: np.ndarray | None = None, is_member: np.ndarray | None = None,
            references: Ensemble | None = None) -> AttackResult:
        if self.output.label_only or not target.returns_probabilities:
            raise OutputUnavailable("RMIA needs probabilities; against labels only use the label-only attacks")
        X_pool, y_pool = _pooled(X, y, population)
        if references is None:
            references = self.train_references(X, y, target.n_classes, population)
        masks = references.masks
        if masks.shape[1] == len(y) and len(y_pool) > len(y):  # population outside the references' pool
            masks = np.concatenate([masks, np.zeros((len(masks), len(y_pool) - len(y)), dtype=bool)], axis=1)
        if masks.shape[1] != len(y_pool):
            raise ValueError("the references were trained on a different pool of records")
        if z_index is None:
            if population is None:
                raise ValueError("RMIA compares candidates with population records: give population or z_index")
            z_index = np.arange(len(y), len(y_pool))
        asked = np.union1d(np.arange(len(y)), z_index)
        start = target.queries
        observed = np.full(len(y_pool), np.nan)
        observed[asked] = self._true_label(observe(target, X_pool[asked], self.output), y_pool[asked])
        outputs = as_published(references.predict_proba(X_pool[asked]), self.output)
        reference = np.full((len(references), len(y_pool)), np.nan)
        reference[:, asked] = self._true_label(outputs, y_pool[asked])
        a = (self.a if self.a is not None else self.tune_a(reference[:, asked], masks[:, asked])) if self.offline else None
        marginal = self._marginal(reference, masks, a)
        if np.isnan(marginal[: len(y)]).any():
            raise ValueError("offline RMIA needs a reference model trained without each candidate")
        ratio = observed / marginal
        ratio_z = np.sort(ratio[z_index][np.isfinite(ratio[z_index])])
        if not len(ratio_z):
            raise ValueError("no population record z has a reference model to compare with")
        # LR(x, z) > gamma  <=>  ratio_z < ratio_x / gamma: counted for all z at once on the sorted ratios
        scores = np.searchsorted(ratio_z, ratio[: len(y)] / self.gamma, side="left") / len(ratio_z)
        learnt = {"a": a} if a is not None else {}
        return _result(self.name, scores, is_member, target.queries - start, learnt=learnt, references=references,
                       ratios=ratio[: len(y)], z_ratios=ratio_z, mode="offline" if self.offline else "online")

    def train_references(self, X: np.ndarray, y: np.ndarray, n_classes: int,
                         population: Data | None = None) -> Ensemble:
        """Online: random halves of the candidates plus ``population`` (each record IN for half of the
        models, as ``LiRA.train_references``). Offline: each model on its own random half of the
        ``population`` only, every candidate OUT."""
        X_pool, y_pool = _pooled(X, y, population)
        if not self.offline:
            masks = random_halves(len(y_pool), self.n_references, self.seed)
        elif population is None:
            raise ValueError("offline RMIA trains its references on population records: give population")
        else:
            n_population = len(population[1])
            shuffled = np.random.default_rng(self.seed).random((self.n_references, n_population)).argsort(axis=1)
            masks = np.zeros((self.n_references, len(y_pool)), dtype=bool)
            masks[:, len(y):] = shuffled < max(1, n_population // 2)  # a random permutation's first half
        return train_ensemble(X_pool, y_pool, masks, n_classes, architecture=self.architecture,
                              config=self.training, seed=self.seed)

    def tune_a(self, reference: np.ndarray, masks: np.ndarray) -> float:
        """The offline ``a`` with the highest AUC when reference model 0 is attacked with the others
        (its members: its own training records), over the records some other model is OUT of;
        ``DEFAULT_A`` with fewer than two models."""
        if len(reference) < 2:
            return self.DEFAULT_A
        members, others, other_masks = masks[0], reference[1:], masks[1:]
        usable = (~other_masks).any(axis=0)
        if members[usable].all() or not members[usable].any():
            return self.DEFAULT_A
        grid = np.round(np.arange(0.0, 1.01, 0.1), 1)
        aucs = [scoring.membership_measures(reference[0, usable] / self._marginal(others, other_masks, a)[usable],
                                            members[usable])["auc"] for a in grid]
        return float(grid[int(np.argmax(aucs))])

    def _marginal(self, reference: np.ndarray, masks: np.ndarray, a: float | None) -> np.ndarray:
        """``Pr(record)``: the mean over every reference model (online), or the offline approximation
        from the OUT models' mean (NaN where no model is OUT)."""
        if a is None:
            return reference.mean(axis=0)
        out = ~masks
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_out = np.where(out, reference, 0.0).sum(axis=0) / out.sum(axis=0)
        return ((1 + a) * mean_out + (1 - a)) / 2

    def _true_label(self, probabilities: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The probability of each record's true label, floored at half a rounding step (or 1e-30)."""
        floor = 0.5 * 10.0 ** -self.output.rounding if self.output.rounding is not None else 1e-30
        index = np.broadcast_to(y, probabilities.shape[:-1])[..., None]
        return np.maximum(np.take_along_axis(probabilities, index, axis=-1)[..., 0], floor)


class LabelOnlyAttack(Attack):
    """Choquette-Choo et al. 2021, sec. 4: members keep their label under perturbation. ``method``:
    ``"augmentation"`` (fraction of shifted copies still classified correctly; needs ``image_shape``),
    ``"noise"`` (fraction of ``n_noise`` Gaussian-noised copies classified correctly), or ``"boundary"``
    (the smallest L2 step along ``n_directions`` random directions that flips the label, found by
    binary search: a random-direction stand-in for the paper's HopSkipJump; 0 if misclassified), or
    ``"hopskipjump"`` (the distance to the boundary HopSkipJump finds, ``attacks.hopskipjump``: Li & Zhang's
    decision-boundary attack, CCS 2021, sec. 3.3, with ``hopskipjump``'s query budget per candidate).
    Only the predicted labels are used, so it runs against a label-only API."""

    name = "label-only"

    def __init__(self, method: str = "noise", *, image_shape: tuple[int, int] | None = None,
                 max_shift: int = 1, n_noise: int = 64, sigma: float = 0.05, n_directions: int = 8,
                 max_distance: float = 8.0, search_steps: int = 10, hopskipjump: HopSkipJump = HopSkipJump(),
                 seed: int = 0):
        if method not in ("augmentation", "noise", "boundary", "hopskipjump"):
            raise ValueError(f"method must be 'augmentation', 'noise', 'boundary' or 'hopskipjump', got {method!r}")
        if method == "augmentation" and image_shape is None:
            raise ValueError("the augmentation attack shifts images: give image_shape")
        self.method = method
        self.image_shape = image_shape
        self.max_shift = max_shift
        self.n_noise = n_noise
        self.sigma = sigma
        self.n_directions = n_directions
        self.max_distance = max_distance
        self.search_steps = search_steps
        self.hopskipjump = hopskipjump
        self.seed = seed

    def run(self, target: Target, X: np.ndarray, y: np.ndarray, *,
            is_member: np.ndarray | None = None) -> AttackResult:
        start = target.queries
        X = np.asarray(X, dtype=np.float64)
        rng = np.random.default_rng(self.seed)
        if self.method == "boundary":
            scores = self._boundary_distance(target, X, y, rng)
        elif self.method == "hopskipjump":
            scores, _ = self.hopskipjump.distances(partial(labels, target), X, y)
        else:
            views = (translations(X, self.image_shape, self.max_shift) if self.method == "augmentation"
                     else X + self.sigma * rng.standard_normal((self.n_noise, *X.shape)))
            scores = (labels(target, views) == y).mean(axis=0)
        return _result(self.name, scores, is_member, target.queries - start, method=self.method)

    def _boundary_distance(self, target: Target, X: np.ndarray, y: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
        directions = unit_directions(rng, self.n_directions, X.shape)
        distances = boundary_distances(partial(labels, target), X, y, directions, self.max_distance, self.search_steps)
        return distances.min(axis=0)


def _log_mass(low: np.ndarray, high: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``log Pr[low <= Z <= high]`` for ``Z ~ N(mean, std^2)``; the log density where ``low == high``
    (a point observation). Computed in the lower tail on the side the interval lies, to stay exact
    far from the mean."""
    point = low == high
    a, b = (low - mean) / std, (high - mean) / std
    flip = a > 0  # Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    a, b = np.where(flip, -b, a), np.where(flip, -a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_b, log_a = log_ndtr(b), log_ndtr(a)
        mass = log_b + np.log1p(-np.exp(np.minimum(log_a - log_b, -1e-300)))
    density = -0.5 * ((low - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return np.where(point, density, np.maximum(mass, -1e4))


def _pooled(X: np.ndarray, y: np.ndarray, population: Data | None) -> Data:
    """The reference models' pool: the candidates, then the attacker's ``population`` if any."""
    if population is None:
        return np.asarray(X), np.asarray(y)
    return np.concatenate([X, population[0]]), np.concatenate([y, population[1]])


def _result(name: str, scores: np.ndarray, is_member: np.ndarray | None, queries: int,
            learnt: dict[str, float] | None = None, **artefacts) -> AttackResult:
    """Scores and their measures; ``learnt``: what the attack found out about the defence (metrics)."""
    metrics = {} if is_member is None else scoring.membership_measures(scores, is_member)
    metrics.update(learnt or {})
    curve = {} if is_member is None else dict(zip(("fpr", "tpr"), scoring.roc(scores, is_member)))
    return AttackResult(name, metrics, queries, {"scores": scores, **curve, **artefacts})


MEMBERSHIP_ATTACKS: dict[str, type[Attack]] = {
    ThresholdAttack.name: ThresholdAttack,
    ShadowModelAttack.name: ShadowModelAttack,
    LiRA.name: LiRA,
    RMIA.name: RMIA,
    LabelOnlyAttack.name: LabelOnlyAttack,
}
