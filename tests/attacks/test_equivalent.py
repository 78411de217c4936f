"""Functionally equivalent extraction (Jagielski et al. 2020, sec. 5): every unit of a ReLU MLP that
bends where the data lives is recovered, the copy agrees with the target far beyond the learned and
L-BFGS copies, and rounding or labels only stop it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import ATTACKS
from attacks.equivalent import FunctionallyEquivalent
from attacks.extraction import EquationSolving
from attacks.targets import OutputFormat, OutputUnavailable, TorchTarget
from benchmarks import models


def _unit_rows(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    W, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    norms = np.linalg.norm(W, axis=1)
    return W / norms[:, None], b / norms


def test_every_unit_of_a_small_relu_network_is_recovered_and_the_copy_is_exact():
    torch.manual_seed(3)
    target = models.make_model("mlp", 10, 3, hidden=8)
    result = FunctionallyEquivalent(8, seed=0).run(TorchTarget(target, 3), np.random.default_rng(1).random((500, 10)))
    W, b = _unit_rows(target)
    copy = result.artefacts["model"]
    found = copy.hidden.weight.detach().numpy()
    X = np.random.default_rng(2).random((2000, 10))
    active = (X @ W.T + b > 0)
    bending = np.flatnonzero(active.any(axis=0) & ~active.all(axis=0))  # units that bend inside the box
    cosines = np.abs(found @ W.T)
    assert (cosines.max(axis=0)[bending] > 0.999).all() and result.metrics["units_found"] == len(bending)
    assert result.metrics["agreement_test"] == 1.0 and result.metrics["fit_residual"] < 1e-3
    assert result.artefacts["curve"] == {"queries": [result.queries], "agreement": [1.0]}
    with torch.no_grad():
        logits = target(torch.as_tensor(X, dtype=torch.float32)).double()
        stolen = copy(torch.as_tensor(X))
    assert torch.allclose(logits - logits[:, :1], stolen, atol=1e-3)  # the same function, not just labels


def test_on_the_digits_mlp_it_beats_equation_solving(digits, digits_split, digits_mlp):
    X_test, y_test = digits.X[digits_split.test], digits.y[digits_split.test]
    aux = digits.X[digits_split.aux]
    oracle = lambda X: models.predict_proba(digits_mlp, X).argmax(axis=1)  # noqa: E731
    equivalent = FunctionallyEquivalent(64, seed=0).run(TorchTarget(digits_mlp, 10), X_test, y_test, aux=aux,
                                                        oracle=oracle)
    solving = EquationSolving(64, restarts=1, max_iter=300, seed=0).run(TorchTarget(digits_mlp, 10), X_test, y_test,
                                                                       oracle=oracle)
    assert equivalent.metrics["agreement_test"] >= 0.98 and solving.metrics["agreement_test"] < 0.95
    assert equivalent.queries <= 60_000 and equivalent.metrics["units_found"] >= 40


def test_rounded_answers_hide_the_kinks_and_labels_refuse_it(digits, digits_split, digits_mlp):
    X_test = digits.X[digits_split.test]
    rounded = FunctionallyEquivalent(64, seed=0, max_queries=20_000).run(
        TorchTarget(digits_mlp, 10, output=OutputFormat(rounding=2)), X_test, aux=digits.X[digits_split.aux])
    assert rounded.metrics["units_found"] < 10 and np.isfinite(rounded.metrics["fit_residual"])
    labels = TorchTarget(digits_mlp, 10, output=OutputFormat(label_only=True))
    with pytest.raises(OutputUnavailable, match="needs probabilities"):
        FunctionallyEquivalent(64).run(labels, X_test)
    assert labels.queries == 0 and ATTACKS["functionally-equivalent"] is FunctionallyEquivalent
