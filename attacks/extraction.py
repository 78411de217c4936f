"""Model extraction: steal a functionally equivalent copy of a prediction API's model.

``equation-solving`` (Tramèr et al. 2016) recovers the parameters of a known model class from the
confidences; ``copycat``, ``knockoff`` and ``jacobian`` train a copy on data labelled by the target,
from probabilities or, when the target gives labels only (or ``labels_only=True``), from labels.
Every attack returns the stolen torch model, its fidelity (``scoring.extraction_measures``) and
an agreement-against-queries curve (artefact ``curve``: ``{"queries": [...], "agreement": [...]}``).

The attacker's copies are its own small architectures (``architecture(hidden)``, an
``ensemble.Architecture``): a softmax regression when ``hidden`` is ``None``, else one hidden ReLU
layer of width ``hidden``. An attack that cannot run against a target (equation solving against
labels only) raises ``OutputUnavailable`` before spending queries.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from attacks.base import Attack, AttackResult
from attacks.copies import train_copies
from attacks.ensemble import Architecture
from attacks.scoring import agreement, extraction_measures, uniform_inputs
from attacks.targets import OutputUnavailable, QueryBudgetExceeded, Target

Labeller = Callable[[np.ndarray], np.ndarray]


def architecture(hidden: int | None) -> Architecture:
    """The attacker's architecture: softmax regression when ``hidden`` is ``None``, else one hidden
    ReLU layer of width ``hidden``."""
    return Architecture("softmax") if hidden is None else Architecture("mlp", hidden)


def n_unknowns(n_features: int, n_classes: int, hidden: int | None) -> int:
    """Free parameters of ``architecture(hidden)`` (a softmax regression has ``(d + 1)(k - 1)``: one class's
    weights are fixed by the others, as the probabilities only see differences of logits)."""
    if hidden is None:
        return (n_features + 1) * (n_classes - 1)
    return hidden * (n_features + 1) + n_classes * (hidden + 1)


def labeller(model: nn.Module) -> Labeller:
    """The labels a torch classifier predicts for a numpy batch."""
    def predict(X: np.ndarray) -> np.ndarray:
        parameter = next(model.parameters())
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(X), dtype=parameter.dtype)).argmax(dim=1).numpy()

    return predict


def soft_targets(answers: np.ndarray, n_classes: int, labels_only: bool) -> tuple[np.ndarray, bool]:
    """Training targets from a target's answers: probability rows renormalised (rounding and top-k
    break the sum), or one-hot rows from labels; and whether labels were used."""
    if answers.ndim == 1 or labels_only:
        labels = answers if answers.ndim == 1 else answers.argmax(axis=1)
        return np.eye(n_classes)[labels], True
    totals = answers.sum(axis=1, keepdims=True)
    return np.where(totals > 0, answers / np.where(totals > 0, totals, 1.0), 1.0 / n_classes), False


def train_copy(X: np.ndarray, targets: np.ndarray, hidden: int | None, *, epochs: int = 150,
               lr: float = 1e-2, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """A fresh copy of ``architecture(hidden)`` fitted to soft targets by minibatch Adam on cross-entropy (knowledge
    distillation, Hinton et al. 2015; with one-hot targets, plain supervised training); ``copies.train_copies``."""
    return train_copies(X, targets, [len(X)], architecture(hidden), epochs=epochs, lr=lr, batch_size=batch_size,
                        seed=seed)[0]


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _checkpoints(n: int, points: int | None) -> list[int]:
    """Query counts at which the agreement curve is measured: ``n``, ``n/2``, ``n/4``... (ascending),
    ``points`` of them, or all of them down to the first query when ``points`` is None."""
    return sorted({max(1, n >> shift) for shift in range(points if points is not None else n.bit_length() + 1)})


def k_center_order(pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` pool indices by greedy k-center (Sener and Savarese, ICLR 2018, sec. 4.2; the selection of
    ActiveThief, Pal et al., AAAI 2020, sec. 3.3, here in input space): start from the record nearest
    the pool's mean, then repeatedly the record farthest from every one chosen. Every prefix covers
    the pool as evenly as its size allows, so a budget cut anywhere leaves a well-spread query set."""
    pool = np.asarray(pool, dtype=np.float64)
    chosen = [int(np.argmin(((pool - pool.mean(axis=0)) ** 2).sum(axis=1)))]
    distance = ((pool - pool[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(min(n, len(pool)) - 1):
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, ((pool - pool[chosen[-1]]) ** 2).sum(axis=1))
    return np.array(chosen)


def _labels_of(oracle: Labeller | None, target: Target) -> Labeller:
    """The evaluator's ground truth; by default the target itself (asked after the attack's spend)."""
    return oracle if oracle is not None else target.predict


def _result(name: str, model: nn.Module, spent: int, curve: dict[str, list], oracle: Labeller,
            X_test: np.ndarray, y_test: np.ndarray | None, **metrics: float) -> AttackResult:
    measures = extraction_measures(labeller(model), oracle, X_test, y_test)
    return AttackResult(name, {**measures, **metrics}, spent, {"model": model, "curve": curve})


class EquationSolving(Attack):
    """Equation-solving extraction (Tramèr et al., "Stealing Machine Learning Models via Prediction
    APIs", USENIX Security 2016, sec. 4.1), with queries drawn uniformly from the feature box.

    A softmax regression is linear in logit space: ``log p_j(x) - log p_0(x) = (w_j - w_0).x + b_j - b_0``,
    so ``(d + 1)(k - 1)`` unknowns follow exactly from ``d + 1`` queries by least squares (sec. 4.1.1,
    binary LR; the same equations per class for multinomial LR). Otherwise (an MLP with a known hidden
    width, or confidences the linear system cannot use) the copy is fitted to the confidences by
    minimising cross-entropy with L-BFGS (sec. 4.1.2; see ``_fit``). ``n_queries`` defaults to
    ``query_factor`` times the unknowns (``n_unknowns``); ``restarts`` to 1 for a softmax regression
    and 8 for an MLP.

    ``rounding=D``: the adaptive variant against outputs rounded to ``D`` decimals (the countermeasure of
    sec. 6.1): each answer ``p`` only says the true confidence lies in ``[p - h, p + h]``, ``h = 10^-D / 2``,
    so the fit maximises the likelihood of those intervals (``_interval_loss``) instead of matching
    the rounded points. Needs probabilities: against a label-only target it raises
    ``OutputUnavailable`` (having spent no query unless the target only found out by asking).
    A model with more unknowns than ``max_queries`` (e.g. the faces MLP: 3.2 million) raises
    ``QueryBudgetExceeded`` before any query: one query per unknown is beyond any budget it is given.
    """

    name = "equation-solving"
    rung = 100
    """L-BFGS iterations every start runs before the first halving (``_fit``)."""

    def __init__(self, hidden: int | None = None, *, n_queries: int | None = None, query_factor: float = 1.0,
                 rounding: int | None = None, noise: float = 0.1, restarts: int | None = None,
                 max_iter: int = 2000, curve_points: int = 3, max_queries: int = 200_000, seed: int = 0):
        self.hidden = hidden
        self.n_queries = n_queries
        self.query_factor = query_factor
        self.rounding = rounding
        self.noise = noise
        self.restarts = restarts if restarts is not None else 1 if hidden is None else 8
        self.max_iter = max_iter
        self.curve_points = curve_points
        self.max_queries = max_queries
        self.seed = seed

    def run(self, target: Target, X_test: np.ndarray, y_test: np.ndarray | None = None, *,
            oracle: Labeller | None = None) -> AttackResult:
        d, k = X_test.shape[1], target.n_classes
        n = self.n_queries or math.ceil(self.query_factor * n_unknowns(d, k, self.hidden))
        if n > self.max_queries:
            raise QueryBudgetExceeded(f"{self.name} needs {n} queries for a model with "
                                      f"{n_unknowns(d, k, self.hidden)} unknowns; its budget is {self.max_queries}")
        start = target.queries
        try:
            if not target.returns_probabilities:
                raise OutputUnavailable("the target returns labels only")
            X = uniform_inputs(n, d, self.seed)
            P = target.predict_proba(X)
        except OutputUnavailable as error:
            raise OutputUnavailable(f"{self.name} needs probabilities: {error}") from error
        spent = target.queries - start
        oracle = _labels_of(oracle, target)
        reference = oracle(X_test)
        curve: dict[str, list] = {"queries": [], "agreement": []}
        for count in _checkpoints(n, self.curve_points):
            model, exact = self._solve(X[:count], P[:count])
            curve["queries"].append(count)
            curve["agreement"].append(agreement(labeller(model)(X_test), reference))
        return _result(self.name, model, spent, curve, oracle, X_test, y_test,
                       exact=float(exact), unknowns=float(n_unknowns(d, k, self.hidden)))

    def _solve(self, X: np.ndarray, P: np.ndarray) -> tuple[nn.Module, bool]:
        """The copy from queries ``X`` and answers ``P``, and whether it was solved exactly."""
        if self.hidden is None and self.rounding is None and (P > 0).all() and len(X) > X.shape[1]:
            return self._solve_linear(X, P), True
        loss = self._interval_loss(P) if self.rounding is not None else self._point_loss(P)
        centre, scale = X.mean(axis=0), X.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        model = self._fit(torch.as_tensor((X - centre) / scale, dtype=torch.float64), P.shape[1], loss)
        first = model[0]
        with torch.no_grad():  # fold the standardisation into the first layer: W (x - c) / s + b
            first.weight /= torch.as_tensor(scale)
            first.bias -= first.weight @ torch.as_tensor(centre)
        return model, False

    @staticmethod
    def _solve_linear(X: np.ndarray, P: np.ndarray) -> nn.Module:
        """Least-squares solution of the logit-space linear system (sec. 4.1.1)."""
        design = np.hstack([X, np.ones((len(X), 1))])
        log_ratios = np.log(P[:, 1:]) - np.log(P[:, :1])
        solution = np.linalg.lstsq(design, log_ratios, rcond=None)[0]
        weights = np.hstack([np.zeros((design.shape[1], 1)), solution]).T
        model = architecture(None).build(X.shape[1], P.shape[1]).double()
        with torch.no_grad():
            model[0].weight.copy_(torch.as_tensor(weights[:, :-1]))
            model[0].bias.copy_(torch.as_tensor(weights[:, -1]))
        return model.eval()

    @staticmethod
    def _point_loss(P: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
        """Cross-entropy to the returned confidences (sec. 4.1.2)."""
        soft = torch.as_tensor(soft_targets(P, P.shape[1], False)[0])
        return lambda logits: _soft_cross_entropy(logits, soft)

    def _interval_loss(self, P: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
        """Negative log-likelihood of the rounding intervals: each log-probability is read through
        Gaussian noise of scale ``noise`` and censored to its interval (interval regression). Unlike
        bare feasibility it favours copies in the middle of the intervals; open-ended intervals
        (answers of 0 or 1) act like classification margins."""
        half = 0.5 * 10.0 ** -self.rounding
        upper, lower = P + half, P - half
        unbounded = 1e4  # log-probabilities are <= 0: a bound this far never binds
        top = torch.as_tensor(np.where(upper < 1.0, np.log(np.minimum(upper, 1.0)), unbounded))
        bottom = torch.as_tensor(np.where(lower > 0.0, np.log(np.maximum(lower, 1e-300)), -unbounded))

        def loss(logits: torch.Tensor) -> torch.Tensor:
            log_q = torch.log_softmax(logits, dim=1)
            high, low = (top - log_q) / self.noise, (bottom - log_q) / self.noise
            flip = low > 0  # Phi(a) - Phi(b) = Phi(-b) - Phi(-a): keep both in the accurate lower tail
            high, low = torch.where(flip, -low, high), torch.where(flip, -high, low)
            log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
            mass = log_high + torch.log1p(-torch.exp(torch.clamp(log_low - log_high, max=-1e-12)))
            return -mass.sum(dim=1).mean()

        return loss

    def _fit(self, inputs: torch.Tensor, n_classes: int,
             loss: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        """Full-batch L-BFGS (strong Wolfe line search) in double precision on standardised inputs,
        from ``restarts`` seeded starts raced by successive halving (Jamieson and Talwalkar, AISTATS
        2016): every start runs ``rung`` iterations, the better half by training loss runs twice as
        many more, and so on; the last start left runs on until the gradient or the step vanishes
        (L-BFGS tolerances) or it has run ``max_iter`` iterations in all."""
        build = architecture(self.hidden).build
        starts = [_Descent(build(inputs.shape[1], n_classes, self.seed + restart).double(), inputs, loss)
                  for restart in range(self.restarts)]
        budget = self.rung
        while len(starts) > 1:
            losses = [start.advance(budget) for start in starts]
            starts = [starts[i] for i in np.argsort(losses)[: (len(starts) + 1) // 2]]
            budget *= 2
        starts[0].advance(self.max_iter - starts[0].iterations)
        return starts[0].model.eval()


class _Descent:
    """One L-BFGS run that can be advanced a number of iterations at a time."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self.inputs, self.loss = model, inputs, loss
        self.optimiser = torch.optim.LBFGS(model.parameters(), lr=1.0, history_size=50, tolerance_grad=1e-9,
                                           tolerance_change=1e-12, line_search_fn="strong_wolfe")

    @property
    def iterations(self) -> int:
        return self.optimiser.state[self.optimiser.param_groups[0]["params"][0]].get("n_iter", 0)

    def advance(self, iterations: int) -> float:
        """Run up to ``iterations`` more iterations; the training loss after them."""
        if iterations > 0:
            self.optimiser.param_groups[0].update(max_iter=iterations, max_eval=iterations * 5 // 4)
            self.optimiser.step(self._closure)
        with torch.no_grad():
            return float(self.loss(self.model(self.inputs)))

    def _closure(self) -> torch.Tensor:
        self.optimiser.zero_grad()
        value = self.loss(self.model(self.inputs))
        value.backward()
        return value


class _LearningAttack(Attack):
    """What the learning-based attacks share: label inputs by the target (probabilities as soft labels,
    or labels: when ``labels_only`` or when the target gives nothing else), train a copy of
    ``architecture(hidden)``, measure fidelity; ``metrics["labels_only"]`` records which was used."""

    def __init__(self, *, hidden: int | None = 64, labels_only: bool = False, epochs: int = 150,
                 curve_points: int | None = 4, seed: int = 0):
        self.hidden = hidden
        self.labels_only = labels_only
        self.epochs = epochs
        self.curve_points = curve_points
        self.seed = seed
        self._used_labels = False

    def _label(self, target: Target, X: np.ndarray) -> np.ndarray:
        targets, used_labels = soft_targets(target.answer(X), target.n_classes, self.labels_only)
        self._used_labels |= used_labels
        return targets

    def _train(self, X: np.ndarray, targets: np.ndarray) -> nn.Module:
        return train_copy(X, targets, self.hidden, epochs=self.epochs, seed=self.seed)

    def _train_with_curve(self, X: np.ndarray, targets: np.ndarray, X_test: np.ndarray,
                          reference: np.ndarray) -> tuple[nn.Module, dict[str, list]]:
        """Copies trained on growing prefixes of the transfer set (in query order), all at once: the
        last is the stolen model, and their test agreement makes the agreement-against-queries curve."""
        counts = _checkpoints(len(X), self.curve_points)
        copies = train_copies(X, targets, counts, architecture(self.hidden), epochs=self.epochs, seed=self.seed)
        curve = {"queries": counts, "agreement": [agreement(labeller(model)(X_test), reference) for model in copies]}
        return copies[-1], curve

    def _finish(self, target: Target, start: int, model: nn.Module, curve: dict[str, list],
                oracle: Labeller, X_test: np.ndarray, y_test: np.ndarray | None) -> AttackResult:
        return _result(self.name, model, target.queries - start, curve, oracle, X_test, y_test,
                       labels_only=float(self._used_labels))


class Copycat(_LearningAttack):
    """Copycat (Correia-Silva et al., "Copycat CNN: Stealing Knowledge by Persuading Confession with
    Random Non-Labeled Data", IJCNN 2018, sec. III): label ``n_queries`` natural inputs from the
    attacker's pool ``aux`` (problem-domain or not) by the target and train a copy on them. The paper
    uses the target's labels only, the default here; ``labels_only=False`` uses probabilities.

    ``selection``: which pool records to ask, in order: ``"random"`` (the paper), or ``"k-center"``
    (``k_center_order``), which spreads a small budget over the pool (0.93 agreement from 112 label-only
    queries on the digits MLP against 0.90 for random, mean of 3 splits). ``curve_points=None`` measures the
    agreement curve at every doubling from the first query."""

    name = "copycat"

    def __init__(self, n_queries: int | None = None, *, labels_only: bool = True, selection: str = "random",
                 **options):
        if selection not in ("random", "k-center"):
            raise ValueError(f"unknown selection {selection!r}: use 'random' or 'k-center'")
        super().__init__(labels_only=labels_only, **options)
        self.n_queries = n_queries
        self.selection = selection

    def run(self, target: Target, X_test: np.ndarray, y_test: np.ndarray | None = None, *,
            aux: np.ndarray, oracle: Labeller | None = None) -> AttackResult:
        start, self._used_labels = target.queries, self.labels_only
        n = min(self.n_queries or len(aux), len(aux))
        order = (k_center_order(aux, n) if self.selection == "k-center"
                 else np.random.default_rng(self.seed).permutation(len(aux))[:n])
        X = np.asarray(aux, dtype=np.float64)[order]
        targets = self._label(target, X)
        oracle = _labels_of(oracle, target)
        model, curve = self._train_with_curve(X, targets, X_test, oracle(X_test))
        return self._finish(target, start, model, curve, oracle, X_test, y_test)


class Knockoff(_LearningAttack):
    """Knockoff Nets (Orekondy et al., "Knockoff Nets: Stealing Functionality of Black-Box Models",
    CVPR 2019, sec. 4): a transfer set of ``n_queries`` inputs from the pool ``aux``, drawn

    - ``strategy="random"``: uniformly from the pool (sec. 4.1.1);
    - ``strategy="adaptive"``: by a gradient-bandit policy over coarse groups of the pool (sec. 4.1.2):
      each step draws a group from ``softmax(H)``, queries ``step_size`` inputs of it, and rewards it
      with certainty (top-1 minus top-2 confidence) + diversity (confidence above the mean of the last
      ``window`` answers) + the online copy's cross-entropy to the answers; ``H`` moves by ``alpha``
      times the reward over its running mean. Groups are the pool's own coarse labels
      (``aux_groups``) or, without them, ``n_groups`` k-means clusters.

    The copy is then trained on the whole transfer set, from probabilities unless ``labels_only``.
    """

    name = "knockoff"

    def __init__(self, strategy: str = "random", n_queries: int | None = None, *, n_groups: int = 10,
                 step_size: int = 8, alpha: float = 0.5, window: int = 10, **options):
        if strategy not in ("random", "adaptive"):
            raise ValueError(f"unknown strategy {strategy!r}: use 'random' or 'adaptive'")
        super().__init__(**options)
        self.strategy = strategy
        self.n_queries = n_queries
        self.n_groups = n_groups
        self.step_size = step_size
        self.alpha = alpha
        self.window = window

    def run(self, target: Target, X_test: np.ndarray, y_test: np.ndarray | None = None, *,
            aux: np.ndarray, aux_groups: np.ndarray | None = None,
            oracle: Labeller | None = None) -> AttackResult:
        start, self._used_labels = target.queries, self.labels_only
        pool = np.asarray(aux, dtype=np.float64)
        n = min(self.n_queries or len(pool), len(pool))
        rng = np.random.default_rng(self.seed)
        if self.strategy == "random":
            X = pool[rng.permutation(len(pool))[:n]]
            targets = self._label(target, X)
        else:
            groups = aux_groups if aux_groups is not None else KMeans(
                self.n_groups, n_init=4, random_state=self.seed).fit_predict(pool)
            X, targets = self._adaptive(target, pool, np.asarray(groups), n, rng)
        oracle = _labels_of(oracle, target)
        model, curve = self._train_with_curve(X, targets, X_test, oracle(X_test))
        return self._finish(target, start, model, curve, oracle, X_test, y_test)

    def _adaptive(self, target: Target, pool: np.ndarray, groups: np.ndarray, n: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The transfer set chosen by the gradient bandit (Sutton and Barto 2018, sec. 2.8)."""
        names, group_of = np.unique(groups, return_inverse=True)
        remaining = [list(rng.permutation(np.flatnonzero(group_of == g))) for g in range(len(names))]
        preferences = np.zeros(len(names))
        torch.manual_seed(self.seed)
        online = architecture(self.hidden).build(pool.shape[1], target.n_classes)
        optimiser = torch.optim.Adam(online.parameters(), lr=1e-2)
        chosen: list[int] = []
        answers: list[np.ndarray] = []
        mean_reward, steps = 0.0, 0
        while len(chosen) < n:
            available = np.array([len(members) > 0 for members in remaining])
            policy = np.where(available, np.exp(preferences - preferences[available].max()), 0.0)
            policy /= policy.sum()
            group = rng.choice(len(names), p=policy)
            picked = [remaining[group].pop() for _ in range(min(self.step_size, len(remaining[group]),
                                                                 n - len(chosen)))]
            X = pool[picked]
            Y = self._label(target, X)
            reward = self._reward(online, X, Y, answers)
            steps += 1
            mean_reward += (reward - mean_reward) / steps
            step = self.alpha * (reward - mean_reward)
            preferences -= step * policy
            preferences[group] += step
            self._update(online, optimiser, X, Y)
            chosen += picked
            answers.append(Y)
        return pool[chosen], np.concatenate(answers)

    def _reward(self, online: nn.Module, X: np.ndarray, Y: np.ndarray, history: list[np.ndarray]) -> float:
        """Certainty + diversity + loss rewards of one step's answers ``Y`` (sec. 4.1.2)."""
        top_two = np.sort(Y, axis=1)[:, -2:]
        certainty = float(np.mean(top_two[:, 1] - top_two[:, 0]))
        recent = np.concatenate(history[-self.window:]) if history else Y
        diversity = float(np.mean(np.maximum(Y - recent.mean(axis=0), 0.0).sum(axis=1)))
        with torch.no_grad():
            loss = float(_soft_cross_entropy(online(torch.as_tensor(X, dtype=torch.float32)),
                                             torch.as_tensor(Y, dtype=torch.float32)))
        return certainty + diversity + loss

    @staticmethod
    def _update(online: nn.Module, optimiser: torch.optim.Optimizer, X: np.ndarray, Y: np.ndarray) -> None:
        optimiser.zero_grad()
        _soft_cross_entropy(online(torch.as_tensor(X, dtype=torch.float32)),
                            torch.as_tensor(Y, dtype=torch.float32)).backward()
        optimiser.step()


class JacobianAugmentation(_LearningAttack):
    """Substitute training with Jacobian-based dataset augmentation (Papernot et al., "Practical
    Black-Box Attacks against Machine Learning", AsiaCCS 2017, sec. 4.2, Algorithm 1): start from
    ``n_seed`` inputs of the pool ``aux``; in each of ``rounds`` rounds, train the substitute on the
    labelled set ``S``, then add ``x + lambda * sign(dF_y(x)/dx)`` for every ``x`` in ``S`` (``y`` its
    label from the target, ``F`` the substitute's softmax), clipped to the feature box, and label the
    new inputs; ``S`` doubles each round. ``lambda = step``, its sign flipped every ``tau`` rounds when
    ``tau`` is set (the periodic step size of sec. 6). The paper labels by the target's labels only,
    the default here; ``labels_only=False`` uses probabilities."""

    name = "jacobian"

    def __init__(self, n_seed: int = 50, rounds: int = 3, *, step: float = 0.1, tau: int | None = None,
                 labels_only: bool = True, **options):
        super().__init__(labels_only=labels_only, **options)
        self.n_seed = n_seed
        self.rounds = rounds
        self.step = step
        self.tau = tau

    def run(self, target: Target, X_test: np.ndarray, y_test: np.ndarray | None = None, *,
            aux: np.ndarray, oracle: Labeller | None = None) -> AttackResult:
        start, self._used_labels = target.queries, self.labels_only
        rng = np.random.default_rng(self.seed)
        X = np.asarray(aux, dtype=np.float64)[rng.permutation(len(aux))[: self.n_seed]]
        targets = self._label(target, X)
        oracle = _labels_of(oracle, target)
        reference = oracle(X_test)
        curve: dict[str, list] = {"queries": [], "agreement": []}
        for round_ in range(self.rounds + 1):
            model = self._train(X, targets)
            curve["queries"].append(len(X))
            curve["agreement"].append(agreement(labeller(model)(X_test), reference))
            if round_ == self.rounds:
                break
            sign = -1.0 if self.tau and (round_ // self.tau) % 2 else 1.0
            new = np.clip(X + sign * self.step * self._jacobian_sign(model, X, targets.argmax(axis=1)), 0.0, 1.0)
            X, targets = np.vstack([X, new]), np.vstack([targets, self._label(target, new)])
        return self._finish(target, start, model, curve, oracle, X_test, y_test)

    @staticmethod
    def _jacobian_sign(model: nn.Module, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``sign(dF_y(x)/dx)`` for each row: the Jacobian row of the substitute's label probability."""
        inputs = torch.as_tensor(X, dtype=torch.float32).requires_grad_(True)
        probabilities = torch.softmax(model(inputs), dim=1)
        probabilities.gather(1, torch.as_tensor(labels)[:, None]).sum().backward()
        return np.sign(inputs.grad.numpy()).astype(np.float64)


EXTRACTION_ATTACKS: dict[str, type[Attack]] = {
    attack.name: attack for attack in (EquationSolving, Copycat, Knockoff, JacobianAugmentation)
}
