"""Model inversion: recover inputs, or a hidden attribute of an input, from a model's answers.

- ``mi-face`` / ``mi-face-blackbox``: MI-Face (Fredrikson, Jha, Ristenpart, CCS 2015, sec. 5.2,
  Algorithm 1), gradient descent on ``1 - p_label(x) + AUXTERM(x)`` with a Process step and the
  paper's stopping rule; white-box (autograd through ``target.module``) or black-box (gradients
  estimated from queried confidences).
- ``inverse-model``: an inversion network trained on auxiliary data that maps the model's
  (possibly truncated or rounded) output, or an intermediate representation, back to the input
  (Yang, Zhang, Chang, Liang, CCS 2019; the split-learning inversion example of OpenMined).
- ``map-attribute`` / ``map-attribute-label-only``: maximum-a-posteriori inference of a hidden
  discrete attribute of a record from the model's confidences or its labels (Fredrikson, Lantz,
  Jha, Lin, Page, Ristenpart, USENIX Security 2014, sec. 4; Fredrikson et al. CCS 2015, sec. 3).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from attacks import scoring
from attacks.base import Attack, AttackResult
from attacks.targets import OutputFormat, OutputUnavailable, Target

CostAndGradient = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Process = Callable[[np.ndarray], np.ndarray]
AuxTerm = Callable[[torch.Tensor], torch.Tensor]


# --- MI-Face (Fredrikson et al. 2015, sec. 5.2) ---------------------------------------------------


@dataclass
class Descent:
    """What Algorithm 1 returns for each row: the lowest-cost iterate and its cost, and how many
    iterations ran before the stopping rule fired."""

    x: np.ndarray
    cost: np.ndarray
    iterations: np.ndarray


def descend(cost_and_gradient: CostAndGradient, x0: np.ndarray, *, alpha: int, beta: int, gamma: float,
            step: float, process: Process) -> Descent:
    """Algorithm 1 of Fredrikson et al. 2015 on a batch of rows, each stopping on its own:
    ``x_i = Process(x_{i-1} - step * grad c(x_{i-1}))``; a row stops when ``c(x_i)`` is at least the
    max of its last ``beta`` costs ``c(x_{i-1}) .. c(x_{i-beta})`` (no progress over a whole window;
    the test needs ``beta`` earlier costs, so a plateau, such as rounded confidences give, runs
    ``beta`` iterations rather than stopping at the first step without progress), when
    ``c(x_i) <= gamma``, or after ``alpha`` iterations; the lowest-cost iterate seen is returned
    (``x0`` included)."""
    x = np.array(x0, dtype=np.float64)
    cost, gradient = cost_and_gradient(x, np.arange(len(x)))
    best_x, best_cost = x.copy(), cost.copy()
    window = np.full((beta, len(x)), -np.inf)  # the last beta costs, oldest overwritten first
    window[0] = cost
    iterations = np.zeros(len(x), dtype=np.int64)
    active = cost > gamma
    for i in range(1, alpha + 1):
        if not active.any():
            break
        rows = np.flatnonzero(active)
        x[rows] = process(x[rows] - step * gradient[rows])
        cost[rows], gradient[rows] = cost_and_gradient(x[rows], rows)
        iterations[active] = i
        improved = active & (cost < best_cost)
        best_x[improved], best_cost[improved] = x[improved], cost[improved]
        stalled = (i >= beta) & (cost >= window.max(axis=0))
        window[i % beta, active] = cost[active]
        active &= ~stalled & (cost > gamma)
    return Descent(best_x, best_cost, iterations)


class ImageFilter:
    """The image Process step of MI-Face (Fredrikson et al. 2015, sec. 5.2, Algorithm 2 denoises and
    then sharpens each iterate): a Gaussian blur of width ``denoise`` pixels (in place of the
    paper's non-local-means denoising, which has no room to work on 8x8 images), then unsharp
    masking of strength ``sharpen``, then clipping to the [0, 1] pixel box. Rows are flattened images."""

    def __init__(self, image_shape: tuple[int, int], denoise: float = 0.5, sharpen: float = 0.5):
        self.image_shape = image_shape
        self.denoise = denoise
        self.sharpen = sharpen

    def __call__(self, X: np.ndarray) -> np.ndarray:
        images = np.asarray(X, dtype=np.float64).reshape(-1, *self.image_shape)
        smooth = ndimage.gaussian_filter(images, sigma=(0, self.denoise, self.denoise), mode="nearest")
        blurred = ndimage.gaussian_filter(smooth, sigma=(0, 1.0, 1.0), mode="nearest")
        sharp = smooth + self.sharpen * (smooth - blurred)
        return np.clip(sharp, 0.0, 1.0).reshape(len(images), -1)


class DenoisingAutoencoder:
    """A Process step learnt from the attacker's auxiliary data (Fredrikson et al. 2015, sec. 5.2,
    Process-DAE): a one-hidden-layer denoising autoencoder (Vincent et al., ICML 2008) trained to
    map inputs with Gaussian noise of width ``noise`` (``copies`` noisy copies of each) back to the
    clean ones. Each Process call moves the iterate by ``strength`` towards its denoised version, a
    relaxed projection onto the data manifold (the paper descends in the autoencoder's code space
    instead; a full projection after every step undoes the step and stalls the descent)."""

    def __init__(self, hidden: int = 32, noise: float = 0.5, copies: int = 10, epochs: int = 30,
                 strength: float = 0.1, seed: int = 0):
        self.hidden = hidden
        self.noise = noise
        self.copies = copies
        self.epochs = epochs
        self.strength = strength
        self.seed = seed
        self.network: nn.Module | None = None

    def fit(self, X: np.ndarray) -> DenoisingAutoencoder:
        clean = torch.as_tensor(np.asarray(X), dtype=torch.float32).repeat(self.copies, 1)
        generator = torch.Generator().manual_seed(self.seed)
        noisy = (clean + self.noise * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
        torch.manual_seed(self.seed)
        d = clean.shape[1]
        self.network = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(),
                                     nn.Linear(self.hidden, d), nn.Sigmoid())
        _fit(self.network, noisy, clean, self.epochs, self.seed)
        return self

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self.network is None:
            raise RuntimeError("fit the denoising autoencoder on the attacker's auxiliary data first")
        with torch.no_grad():
            denoised = self.network(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
        return np.clip(X + self.strength * (denoised - X), 0.0, 1.0)


def _clip_to_box(X: np.ndarray) -> np.ndarray:
    return np.clip(X, 0.0, 1.0)


class MIFace(Attack):
    """MI-Face, white-box (Fredrikson et al. 2015, sec. 5.2, Algorithm 1): for each label, gradient
    descent from the all-zero input on ``c(x) = 1 - p_label(x) + AUXTERM(x)`` with gradients by
    autograd through ``target.module``, the Process step after each step, and the paper's stopping
    rule (see ``descend``). ``alpha``, ``beta`` and ``step`` default to the paper's 5000, 100, 0.1;
    ``gamma`` is the cost below which a row is done. ``process`` defaults to clipping to the [0, 1]
    feature box; ``ImageFilter`` (denoise and sharpen) and ``DenoisingAutoencoder`` (learnt from
    auxiliary data) are the paper's Process variants. ``start`` is the first iterate (one row for
    every label, or one per label; default the all-zero input of the paper).

    A white-box attacker differentiates the module itself, so output defences (rounding, top-k)
    do not reach it; ``mi-face-blackbox`` is the variant that reads the API's answers."""

    name = "mi-face"

    def __init__(self, alpha: int = 5000, beta: int = 100, gamma: float = 1e-3, step: float = 0.1,
                 process: Process | None = None, aux_term: AuxTerm | None = None,
                 start: np.ndarray | None = None):
        self.alpha = alpha
        self.start = start
        self.beta = beta
        self.gamma = gamma
        self.step = step
        self.process = process or _clip_to_box
        self.aux_term = aux_term

    def run(self, target: Target, n_features: int, labels: np.ndarray | None = None,
            references: np.ndarray | None = None, evaluator: Callable | None = None,
            judge: scoring.Judge | None = None) -> AttackResult:
        """Invert each of ``labels`` (default: every class). ``references`` (one row per label,
        e.g. the class means), ``evaluator`` (an independent classifier: batch -> labels) and
        ``judge`` (``scoring.Judge``) are only used to measure the reconstructions."""
        labels = np.arange(target.n_classes) if labels is None else np.asarray(labels)
        queries_before = target.queries
        cost_and_gradient = self._cost_and_gradient(target, labels)
        start = np.zeros(n_features) if self.start is None else np.asarray(self.start, dtype=np.float64)
        x0 = np.broadcast_to(start, (len(labels), n_features)).copy()
        result = descend(cost_and_gradient, x0, alpha=self.alpha,
                         beta=self.beta, gamma=self.gamma, step=self.step, process=self.process)
        metrics = {"cost": float(result.cost.mean()), "iterations": float(result.iterations.mean())}
        metrics.update(_image_measures(result.x, labels, references, evaluator, judge))
        return AttackResult(self.name, metrics, target.queries - queries_before,
                            {"reconstructions": result.x, "labels": labels, "costs": result.cost})

    def _cost_and_gradient(self, target: Target, labels: np.ndarray) -> CostAndGradient:
        if not hasattr(target, "module"):
            raise OutputUnavailable("mi-face needs a white-box TorchTarget (its module's gradients); "
                                    "use mi-face-blackbox for an API")
        module = target.module.eval()

        def cost_and_gradient(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = torch.as_tensor(X, dtype=torch.float32).requires_grad_(True)
            probabilities = torch.softmax(module(x).double(), dim=1)
            confidence = probabilities[torch.arange(len(rows)), torch.as_tensor(labels[rows])]
            (gradient,) = torch.autograd.grad(-confidence.sum(), x)
            aux_cost, aux_gradient = self._aux(X)
            return 1 - confidence.detach().numpy() + aux_cost, gradient.double().numpy() + aux_gradient

        return cost_and_gradient

    def _aux(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AUXTERM(x) and its gradient (zero unless ``aux_term`` is given; it is the attacker's own,
        so its gradient is exact in both variants)."""
        if self.aux_term is None:
            return np.zeros(len(X)), np.zeros_like(X)
        x = torch.as_tensor(X, dtype=torch.float64).requires_grad_(True)
        cost = self.aux_term(x)
        (gradient,) = torch.autograd.grad(cost.sum(), x)
        return cost.detach().numpy(), gradient.numpy()


class MIFaceBlackBox(MIFace):
    """MI-Face with only the API's confidences (Algorithm 1 of Fredrikson et al. 2015, sec. 5.2,
    with the gradient estimated numerically as in their black-box setting): each step estimates the
    gradient of ``p_label`` by the two-point zeroth-order estimator with ``directions`` random
    Gaussian directions and radius ``smoothing`` (Nesterov and Spokoiny, "Random gradient-free
    minimization of convex functions", 2017), sending the current iterates and all their probes as
    one query batch.

    ``output`` is the API's public format: with rounded confidences the probes' differences vanish
    below the rounding step, so the adaptive attacker widens ``smoothing`` to at least
    ``10 ** -rounding`` (Fredrikson et al. 2015, sec. 7, proposes rounding as the countermeasure).
    Label-only answers carry no confidence to differentiate: the attack then raises
    ``OutputUnavailable`` instead of running.

    With ``image_shape`` and ``coarse > 1`` the probe directions are drawn on a grid ``coarse``
    times coarser and upsampled (the tiling prior of Ilyas, Engstrom, Madry, ICLR 2019): the
    estimate then lives in a space ``coarse**2`` times smaller, which makes it far less noisy for
    the same queries on large images."""

    name = "mi-face-blackbox"

    def __init__(self, alpha: int = 5000, beta: int = 100, gamma: float = 1e-3, step: float = 0.1,
                 process: Process | None = None, aux_term: AuxTerm | None = None, directions: int = 16,
                 smoothing: float = 1e-2, output: OutputFormat = OutputFormat(), seed: int = 0,
                 start: np.ndarray | None = None, image_shape: tuple[int, ...] | None = None, coarse: int = 1):
        super().__init__(alpha, beta, gamma, step, process, aux_term, start)
        if coarse > 1 and image_shape is None:
            raise ValueError("coarse probes need the image_shape")
        self.image_shape = image_shape
        self.coarse = coarse
        self.directions = directions
        self.output = output
        self.smoothing = smoothing if output.rounding is None else max(smoothing, 10.0 ** -output.rounding)
        self.seed = seed

    def _cost_and_gradient(self, target: Target, labels: np.ndarray) -> CostAndGradient:
        if self.output.label_only or not target.returns_probabilities:
            raise OutputUnavailable("mi-face-blackbox needs confidences: the API answers labels only, "
                                    "no gradients to estimate")
        rng = np.random.default_rng(self.seed)
        q, mu = self.directions, self.smoothing

        def cost_and_gradient(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            m, d = X.shape
            U = self._directions(rng, m, q, d)
            probes = np.concatenate([X[:, None], X[:, None] + mu * U, X[:, None] - mu * U], axis=1)
            answers = target.predict_proba(probes.reshape(-1, d)).reshape(m, 2 * q + 1, -1)
            confidence = answers[np.arange(m), :, labels[rows]]
            difference = confidence[:, 1 : q + 1] - confidence[:, q + 1 :]
            gradient = np.einsum("mq,mqd->md", difference, U) / (2 * mu * q)
            aux_cost, aux_gradient = self._aux(X)
            return 1 - confidence[:, 0] + aux_cost, aux_gradient - gradient

        return cost_and_gradient

    def _directions(self, rng: np.random.Generator, m: int, q: int, d: int) -> np.ndarray:
        """``(m, q, d)`` Gaussian probe directions, piecewise constant on ``coarse`` x ``coarse`` tiles."""
        if self.coarse == 1:
            return rng.standard_normal((m, q, d))
        h, w, *channels = self.image_shape
        c = self.coarse
        tiles = rng.standard_normal((m, q, -(-h // c), -(-w // c), *channels))
        return tiles.repeat(c, axis=2).repeat(c, axis=3)[:, :, :h, :w].reshape(m, q, d)


# --- Inverse model (Yang et al. 2019) ----------------------------------------------------------------


class InverseModel(Attack):
    """Training-based inversion (Yang, Zhang, Chang, Liang, CCS 2019, sec. 4; the OpenMined
    split-learning example): query the target on the attacker's auxiliary inputs (never its
    training data), train an inversion network from the answers back to the inputs, and apply it to
    the answers observed for the victims' inputs.

    ``output`` is the API's public format: the training answers go through ``output.apply`` so the
    network learns from vectors truncated/rounded exactly like the observed ones (Yang et al. train
    on truncated vectors the same way). The network reads log-confidences (floored at
    ``1e-6``, so rounded or truncated zeros stay finite), or one-hot labels from a label-only API,
    standardised on the auxiliary answers.
    With ``representation`` (a callable returning an intermediate layer's activations, as the
    server of a split network receives them) it inverts that representation instead of the output."""

    name = "inverse-model"

    def __init__(self, hidden: int = 128, epochs: int = 100, output: OutputFormat = OutputFormat(),
                 representation: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0):
        self.hidden = hidden
        self.epochs = epochs
        self.output = output
        self.representation = representation
        self.seed = seed

    def run(self, target: Target, aux_X: np.ndarray, observed: np.ndarray,
            victims_X: np.ndarray | None = None, victims_y: np.ndarray | None = None,
            evaluator: Callable | None = None, judge: scoring.Judge | None = None) -> AttackResult:
        """Reconstruct the inputs behind ``observed`` (the answers or representations the attacker
        saw for the victims). ``victims_X``/``victims_y``/``evaluator`` only measure the outcome;
        ``baseline_reconstruction_error`` is that of guessing the auxiliary mean for every victim."""
        aux_X = np.asarray(aux_X, dtype=np.float64)
        queries_before = target.queries
        features = self._features(target, aux_X)
        centre, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
        torch.manual_seed(self.seed)
        network = nn.Sequential(nn.Linear(features.shape[1], self.hidden), nn.ReLU(),
                                nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                                nn.Linear(self.hidden, aux_X.shape[1]), nn.Sigmoid())
        as_tensor = lambda array: torch.as_tensor(array, dtype=torch.float32)
        _fit(network, as_tensor((features - centre) / scale), as_tensor(aux_X), self.epochs, self.seed)
        with torch.no_grad():
            observed_features = self._encode(np.asarray(observed, dtype=np.float64))
            reconstructions = network(as_tensor((observed_features - centre) / scale)).double().numpy()
        metrics = _image_measures(reconstructions, victims_y, victims_X, evaluator, judge)
        if victims_X is not None:
            metrics["baseline_reconstruction_error"] = scoring.reconstruction_error(
                np.broadcast_to(aux_X.mean(axis=0), np.shape(victims_X)), victims_X)
        return AttackResult(self.name, metrics, target.queries - queries_before,
                            {"reconstructions": reconstructions, "network": network})

    def _features(self, target: Target, X: np.ndarray) -> np.ndarray:
        if self.representation is not None:
            return self._encode(self.representation(X))
        if self.output.label_only:
            return np.eye(target.n_classes)[target.predict(X)]
        return self._encode(self.output.apply(target.predict_proba(X)))

    def _encode(self, answers: np.ndarray) -> np.ndarray:
        answers = np.asarray(answers, dtype=np.float64)
        if self.representation is not None or self.output.label_only:
            return answers
        return np.log(np.maximum(answers, 1e-6))


# --- MAP attribute inference (Fredrikson et al. 2014) -------------------------------------------------


class MAPAttribute(Attack):
    """Model inversion of a hidden discrete attribute (Fredrikson, Lantz, Jha, Lin, Page, Ristenpart,
    USENIX Security 2014, sec. 4; Fredrikson, Jha, Ristenpart, CCS 2015, sec. 3 and 4). Given a
    record's other attributes and its true label ``y``, query the model once per candidate value
    ``v`` of column ``attribute`` and pick the maximum a posteriori value
    ``argmax_v prior(v) * P(y | record with v)``, the prior being the attribute's marginal on the
    attacker's auxiliary data:

    - by default (confidences) ``P(y | record with v)`` is the model's own confidence in ``y``
      (floored at ``1e-6``, so rounded or truncated zeros do not veto a value);
    - with ``label_only`` it is the error model ``err(y, f(record with v))`` of the 2014 paper in its
      discrete form, ``P(true label y | model answers y')`` from the target's confusion matrix on the
      auxiliary data (queried once); only predicted labels are read, so it runs against label-only APIs.

    The measures sit beside the no-model reference (``attribute_reference``): the best predictor of
    the attribute the attacker can train on its own data from the other attributes and the label,
    without the model, ``advantage_*`` the attack's gain over it, ``records`` the records inferred (the
    trials of accuracy's binomial interval); ``baseline_*`` is the prior's mode."""

    name = "map-attribute"

    def __init__(self, attribute: int, values: np.ndarray, positive: float | None = None,
                 smoothing: float = 1.0, label_only: bool = False, seed: int = 0):
        self.attribute = attribute
        self.values = np.asarray(values, dtype=np.float64)
        self.positive = positive
        self.smoothing = smoothing
        self.label_only = label_only
        self.seed = seed

    def run(self, target: Target, records: np.ndarray, labels: np.ndarray, aux_X: np.ndarray,
            aux_y: np.ndarray, truth: np.ndarray | None = None,
            members: np.ndarray | None = None) -> AttackResult:
        """Infer column ``attribute`` of ``records`` (whatever it holds there is ignored) from their
        ``labels``. ``truth`` (the hidden values) and ``members`` (a boolean mask of the target's
        training records) are only used to measure accuracy and precision, overall and per group."""
        if not self.label_only and not target.returns_probabilities:
            raise OutputUnavailable("confidence-based MAP needs confidences: the API answers labels only "
                                    "(map-attribute-label-only reads labels)")
        records, labels = np.asarray(records, dtype=np.float64), np.asarray(labels)
        aux_X, aux_y = np.asarray(aux_X, dtype=np.float64), np.asarray(aux_y)
        queries_before = target.queries
        prior = self._count(self._codes(aux_X), len(self.values))
        candidates = np.repeat(records, len(self.values), axis=0)
        candidates[:, self.attribute] = np.tile(self.values, len(records))
        shape = (len(records), len(self.values))
        artefacts = {"prior": prior}
        if self.label_only:
            confusion = self._confusion(target.predict(aux_X), aux_y, target.n_classes)
            likelihood = confusion[labels[:, None], target.predict(candidates).reshape(shape)]
            artefacts["confusion"] = confusion
        else:
            answers = target.predict_proba(candidates).reshape(*shape, -1)
            likelihood = np.maximum(answers[np.arange(len(records)), :, labels], 1e-6)
        posterior = prior[None] * likelihood
        guesses = self.values[posterior.argmax(axis=1)]
        metrics = {}
        if truth is not None:
            reference = attribute_reference(aux_X, aux_y, self.attribute, self.values, target.n_classes, self.seed)
            metrics = self._measures(guesses, reference(records, labels), np.asarray(truth, dtype=np.float64),
                                     prior, members)
        posterior /= posterior.sum(axis=1, keepdims=True)
        return AttackResult(self.name, metrics, target.queries - queries_before,
                            {**artefacts, "guesses": guesses, "posterior": posterior})

    def _codes(self, X: np.ndarray) -> np.ndarray:
        return np.abs(X[:, self.attribute, None] - self.values).argmin(axis=1)

    def _count(self, codes: np.ndarray, n: int) -> np.ndarray:
        counts = np.bincount(codes, minlength=n) + self.smoothing
        return counts / counts.sum()

    def _confusion(self, predicted: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
        """``err[y, y'] = P(true label y | model answers y')``, Laplace-smoothed."""
        counts = np.zeros((k, k)) + self.smoothing
        np.add.at(counts, (np.asarray(true), np.asarray(predicted)), 1)
        return counts / counts.sum(axis=0, keepdims=True)

    def _measures(self, guesses: np.ndarray, reference: np.ndarray, truth: np.ndarray, prior: np.ndarray,
                  members: np.ndarray | None) -> dict[str, float]:
        positive = self.values[prior.argmin()] if self.positive is None else self.positive
        baseline = np.full_like(truth, self.values[prior.argmax()])
        groups = {"": np.ones(len(truth), dtype=bool)}
        if members is not None:
            members = np.asarray(members, dtype=bool)
            groups.update({"members_": members, "nonmembers_": ~members})
        metrics = {}
        for prefix, rows in groups.items():
            if rows.any():
                measured = {name: scoring.attribute_inference_measures(values[rows], truth[rows], positive)
                            for name, values in (("", guesses), ("reference_", reference))}
                for name, measures in measured.items():
                    metrics.update({prefix + name + key: value for key, value in measures.items()})
                metrics.update({f"{prefix}advantage_{key}": value - measured["reference_"][key]
                                for key, value in measured[""].items()})
                metrics[prefix + "records"] = float(rows.sum())
                metrics[prefix + "baseline_accuracy"] = float(np.mean(baseline[rows] == truth[rows]))
                metrics[prefix + "baseline_precision"] = float(np.mean(truth[rows] == positive))
        return metrics


class MAPAttributeLabelOnly(MAPAttribute):
    """``MAPAttribute`` reading predicted labels only (the 2014 paper's error model)."""

    name = "map-attribute-label-only"

    def __init__(self, attribute: int, values: np.ndarray, positive: float | None = None,
                 smoothing: float = 1.0, seed: int = 0):
        super().__init__(attribute, values, positive, smoothing, label_only=True, seed=seed)


def attribute_reference(aux_X: np.ndarray, aux_y: np.ndarray, attribute: int, values: np.ndarray,
                        n_classes: int, seed: int = 0) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The no-model reference of attribute inference: the best predictor of column ``attribute``
    from the other columns and the label that the attacker can train on its own data
    (``best_classifier``). Returns ``guess(records, labels) -> values``."""
    def inputs(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.column_stack([np.delete(X, attribute, axis=1), np.eye(n_classes)[y]])

    codes = np.abs(aux_X[:, attribute, None] - values).argmin(axis=1)
    best = best_classifier(inputs(aux_X, aux_y), codes, seed)
    return lambda records, labels: values[best.predict(inputs(np.asarray(records, dtype=np.float64),
                                                              np.asarray(labels)))]


def best_classifier(inputs: np.ndarray, codes: np.ndarray, seed: int = 0):
    """The prior's mode, logistic regression or a random forest, whichever has the best 3-fold
    cross-validated accuracy at predicting ``codes`` from ``inputs``, fitted on all of them."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    candidates = [DummyClassifier(strategy="most_frequent"), LogisticRegression(max_iter=2000),
                  RandomForestClassifier(100, min_samples_leaf=2, random_state=seed)]
    folds = min(3, int(np.bincount(codes).max()))
    if len(np.unique(codes)) < 2 or folds < 2:
        best = candidates[0]
    else:
        scores = [cross_val_score(model, inputs, codes, cv=folds).mean() for model in candidates]
        best = candidates[int(np.argmax(scores))]
    return best.fit(inputs, codes)


def _image_measures(reconstructions: np.ndarray, labels: np.ndarray, references: np.ndarray | None,
                    evaluator: Callable | None, judge: scoring.Judge | None = None) -> dict[str, float]:
    """Reconstruction error to ``references``, identification accuracy by ``evaluator``, and the
    ``judge``'s measures (which replace the evaluator's identification), where given."""
    metrics = {}
    if references is not None:
        metrics["reconstruction_error"] = scoring.reconstruction_error(reconstructions, references)
    if evaluator is not None:
        metrics["identification_accuracy"] = scoring.identification_accuracy(
            evaluator, reconstructions, labels)
    if judge is not None:
        metrics.update(judge.measures(reconstructions, labels))
    return metrics


def _fit(network: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor, epochs: int, seed: int,
         batch_size: int = 64, lr: float = 1e-2) -> nn.Module:
    """Minibatch Adam on mean squared error."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            optimiser.zero_grad()
            nn.functional.mse_loss(network(inputs[batch]), outputs[batch]).backward()
            optimiser.step()
    return network.eval()


INVERSION_ATTACKS: dict[str, type[Attack]] = {
    attack.name: attack for attack in (MIFace, MIFaceBlackBox, InverseModel, MAPAttribute, MAPAttributeLabelOnly)}
