"""Learned and membership-based attribute inference (``attacks.attribute``) on a model that memorised its
members: a binary attribute that, with one other feature, sets the label, 30% of labels flipped; the
attacker's own records carry the same relation. The model's answers reveal the members' attribute beyond
the no-model reference and beyond the non-members'; a model that never saw them answers alike for both."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.attribute import LearnedAttribute, MembershipAttribute
from attacks.membership import ThresholdAttack
from attacks.targets import CallableTarget, OutputFormat
from benchmarks import models

VALUES = np.array([0.0, 1.0])


def records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 6))
    X[:, 0] = rng.integers(0, 2, n)
    y = ((X[:, 1] > 0.5) ^ (X[:, 0] == 1)).astype(np.int64)
    flipped = rng.random(n) < 0.3
    return X, np.where(flipped, 1 - y, y)


def memorising_model(X: np.ndarray, y: np.ndarray):
    recipe = models.Recipe("mlp", hidden=256, lr=1e-2, epochs=300)
    torch.manual_seed(0)
    model = recipe.build(6, 2)
    models.train_recipe(model, recipe, X.astype(np.float32), y, seed=0)
    return model


@pytest.fixture(scope="module")
def game(one_torch_thread):
    """200 members, 200 non-members (the victims) and 200 records of the attacker's."""
    X, y = records(600, seed=0)
    members, others, aux = slice(0, 200), slice(200, 400), slice(400, 600)
    victims = np.concatenate([X[members], X[others]]), np.concatenate([y[members], y[others]])
    is_member = np.arange(400) < 200
    return memorising_model(X[members], y[members]), victims, (X[aux], y[aux]), is_member


def attacks(output: OutputFormat):
    return {"learned": LearnedAttribute(0, VALUES, positive=1.0),
            "membership": MembershipAttribute(0, VALUES, ThresholdAttack("loss", output=output), positive=1.0)}


def run(attack, model, victims, aux, is_member, output=OutputFormat()):
    target = CallableTarget(lambda X: models.predict_proba(model, X), 2, output=output)
    (X, y), (aux_X, aux_y) = victims, aux
    return attack.run(target, X, y, aux_X, aux_y, truth=X[:, 0].copy(), members=is_member), target


@pytest.mark.parametrize("name", ["learned", "membership"])
def test_the_answers_reveal_the_members_attribute_beyond_the_no_model_reference(game, name):
    model, victims, aux, is_member = game
    result, target = run(attacks(OutputFormat())[name], model, victims, aux, is_member)
    metrics = result.metrics
    assert metrics["members_accuracy"] >= metrics["members_reference_accuracy"] + 0.1, metrics
    assert metrics["members_accuracy"] >= metrics["nonmembers_accuracy"] + 0.1, metrics
    queried = 2 * (400 + (200 if name == "learned" else 0))  # each value, victims (and the attacker's records)
    assert result.queries == target.queries == queried


def test_learned_attack_reads_labels_only(game):
    model, victims, aux, is_member = game
    result, _ = run(attacks(OutputFormat(label_only=True))["learned"], model, victims, aux, is_member,
                    OutputFormat(label_only=True))
    assert result.metrics["members_accuracy"] >= result.metrics["members_reference_accuracy"] + 0.05


@pytest.mark.parametrize("name", ["learned", "membership"])
def test_a_model_that_never_saw_the_victims_tells_members_no_better_than_others(game, name):
    """It still knows the population's relation (better than the attacker's 200 records teach the
    reference), so it may beat the reference; but nothing singles out the members."""
    _, victims, aux, is_member = game
    stranger = memorising_model(*records(200, seed=1))
    metrics = run(attacks(OutputFormat())[name], stranger, victims, aux, is_member)[0].metrics
    assert abs(metrics["members_accuracy"] - metrics["nonmembers_accuracy"]) <= 0.08, metrics
