"""Model extraction against in-process targets: Tramèr et al.'s exact cases, the rounding-aware
variant, the label-only outcome, and learning-based copies from labels only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import ATTACKS
from attacks.extraction import (Copycat, EquationSolving, JacobianAugmentation, Knockoff, k_center_order,
                                n_unknowns)
from attacks.targets import OutputFormat, OutputUnavailable, QueryBudgetExceeded, TorchTarget
from benchmarks import datasets, models


def oracle(model):
    return lambda X: models.predict_proba(model, X).argmax(axis=1)


@pytest.fixture(scope="module")
def cancer_lr(breast_cancer):
    split = datasets.split(breast_cancer, seed=0)
    model = models.train_target("softmax", breast_cancer.X[split.train], breast_cancer.y[split.train], 2,
                                seed=0, epochs=60)
    return model, breast_cancer.X[split.test], breast_cancer.y[split.test]


def test_registry():
    assert {"equation-solving", "copycat", "knockoff", "jacobian"} <= set(ATTACKS)


def test_binary_lr_is_recovered_exactly_from_d_plus_1_queries(cancer_lr):
    model, X_test, y_test = cancer_lr
    result = EquationSolving().run(TorchTarget(model, 2), X_test, y_test, oracle=oracle(model))
    assert result.queries == 31 == X_test.shape[1] + 1
    assert result.metrics["exact"] == 1.0
    assert result.metrics["agreement_test"] == 1.0 and result.metrics["agreement_uniform"] == 1.0
    assert result.metrics["accuracy_test"] == pytest.approx(models.accuracy(model, X_test, y_test))


def test_softmax_lr_on_digits_with_no_more_queries_than_unknowns(digits, digits_split, digits_softmax):
    X_test, y_test = digits.X[digits_split.test], digits.y[digits_split.test]
    result = EquationSolving().run(TorchTarget(digits_softmax, 10), X_test, y_test, oracle=oracle(digits_softmax))
    assert result.queries == n_unknowns(64, 10, None) <= (64 + 1) * 10
    assert result.metrics["agreement_test"] >= 0.999 and result.metrics["agreement_uniform"] >= 0.999
    stolen = result.artefacts["model"]
    np.testing.assert_allclose(models.predict_proba(stolen.float(), X_test),
                               models.predict_proba(digits_softmax, X_test), atol=1e-4)
    curve = result.artefacts["curve"]
    assert curve["queries"] == sorted(curve["queries"]) and curve["queries"][-1] == result.queries


@pytest.mark.parametrize("decimals", [2, 1])
def test_rounding_aware_fit_beats_the_plain_one(cancer_lr, decimals):
    """Averaged over three query sets of 4x the unknowns, against outputs rounded to 2 and 1 decimals."""
    model, X_test, _ = cancer_lr
    target_output = OutputFormat(rounding=decimals)

    def mean_agreement(rounding):
        runs = [EquationSolving(rounding=rounding, query_factor=4, max_iter=200, curve_points=1, seed=seed)
                .run(TorchTarget(model, 2, output=target_output), X_test, oracle=oracle(model)).metrics
                for seed in range(3)]
        return np.mean([[run["agreement_test"], run["agreement_uniform"]] for run in runs], axis=0)

    plain, aware = mean_agreement(None), mean_agreement(decimals)
    assert aware[1] > plain[1] and aware[0] >= plain[0]


def test_equation_solving_says_it_needs_probabilities(cancer_lr):
    model, X_test, _ = cancer_lr
    target = TorchTarget(model, 2, output=OutputFormat(label_only=True))
    with pytest.raises(OutputUnavailable, match="equation-solving needs probabilities: .*labels only"):
        EquationSolving().run(target, X_test, oracle=oracle(model))
    assert target.queries == 0


def test_equation_solving_refuses_a_model_with_more_unknowns_than_its_budget(cancer_lr):
    """One query per unknown: a 3000-unit MLP on 30 features (96k unknowns) is over a 50k budget,
    refused before any query instead of allocating the queries."""
    model, X_test, _ = cancer_lr
    target = TorchTarget(model, 2)
    with pytest.raises(QueryBudgetExceeded, match="needs 9\\d{4} queries .* budget is 50000"):
        EquationSolving(hidden=3000, max_queries=50_000).run(target, X_test, oracle=oracle(model))
    assert target.queries == 0


@pytest.mark.parametrize("attack", [Copycat(epochs=60), Knockoff("adaptive", 200, epochs=60),
                                    JacobianAugmentation(n_seed=40, rounds=2, epochs=60)],
                         ids=["copycat", "knockoff-adaptive", "jacobian"])
def test_learning_based_copies_from_labels_only_beat_chance(digits, digits_split, digits_mlp, attack):
    X_test, y_test = digits.X[digits_split.test], digits.y[digits_split.test]
    target = TorchTarget(digits_mlp, 10, output=OutputFormat(label_only=True))
    result = attack.run(target, X_test, y_test, aux=digits.X[digits_split.aux], oracle=oracle(digits_mlp))
    assert result.metrics["labels_only"] == 1.0  # fell back to labels by itself (knockoff) or by design
    assert result.metrics["agreement_test"] >= 0.6  # chance is about 0.1
    assert result.queries == target.queries == result.artefacts["curve"]["queries"][-1]


def test_knockoff_uses_probabilities_when_there_are_some(digits, digits_split, digits_mlp):
    X_test = digits.X[digits_split.test]
    result = Knockoff(n_queries=100, epochs=60, curve_points=1).run(
        TorchTarget(digits_mlp, 10), X_test, aux=digits.X[digits_split.aux], oracle=oracle(digits_mlp))
    assert result.metrics["labels_only"] == 0.0 and result.queries == 100
    assert result.metrics["agreement_test"] >= 0.6


def test_mlp_of_known_width_from_twice_its_unknowns(digits, digits_split):
    """A 16-unit MLP (1,210 unknowns) from 2,420 uniform queries, 8 L-BFGS starts raced by successive
    halving: the median over the attack's seeds 0-2 reaches >= 99% agreement on uniform inputs (seeds
    0-7 measured: 7 of 8 reach 0.998+, seed 1 stops in a local minimum at 0.98). Test agreement is
    lower, as uniform queries rarely switch the hidden units that the digits switch (Tramèr et al.
    2016, Table 4 report 99.89% test / 99.82% uniform on Adult)."""
    X_train, y_train = digits.X[digits_split.train], digits.y[digits_split.train]
    torch.manual_seed(0)
    target = models.train(models.make_model("mlp", 64, 10, hidden=16), X_train, y_train, epochs=60, seed=0)
    runs = [EquationSolving(hidden=16, query_factor=2, curve_points=1, seed=seed).run(
        TorchTarget(target, 10), digits.X[digits_split.test], oracle=oracle(target)) for seed in range(3)]
    assert all(run.queries == 2 * n_unknowns(64, 10, 16) == 2420 for run in runs)
    assert np.median([run.metrics["agreement_uniform"] for run in runs]) >= 0.99
    assert np.median([run.metrics["agreement_test"] for run in runs]) >= 0.95


def test_k_center_copycat_copies_the_digits_mlp_from_112_labels(digits, digits_split, digits_mlp):
    """ART's CopycatCNN/KnockoffNets reach 0.89-0.915 agreement from 112 label-only queries here; the
    curve starts at the first query and halves down to it from the budget."""
    X_test = digits.X[digits_split.test]
    target = TorchTarget(digits_mlp, 10, output=OutputFormat(label_only=True))
    result = Copycat(112, selection="k-center", curve_points=None).run(
        target, X_test, aux=digits.X[digits_split.aux], oracle=oracle(digits_mlp))
    assert result.queries == 112 and result.metrics["agreement_test"] >= 0.89
    assert result.artefacts["curve"]["queries"] == [1, 3, 7, 14, 28, 56, 112]


def test_k_center_order_spreads_every_prefix():
    pool = np.concatenate([np.zeros((50, 2)), np.ones((50, 2)), [[10.0, 10.0]]])
    order = k_center_order(pool, 3)
    assert len(set(order)) == 3 and 100 in order[:2]  # the outlier is the farthest from the centre
    assert {tuple(pool[i]) for i in order} == {(0.0, 0.0), (1.0, 1.0), (10.0, 10.0)}
