"""HopSkipJump (``attacks.hopskipjump``) against linear classifiers, whose nearest boundary is known in
closed form: the distance it finds is never shorter than the true one and close to it, within its query
budget; one call searches several models at once (the reference models of a calibrated attack)."""
from __future__ import annotations

import numpy as np
import pytest

from attacks.hopskipjump import HopSkipJump
from attacks.observations import labels
from attacks.targets import CallableTarget, OutputFormat

D, K = 16, 4
SEARCH = HopSkipJump(max_queries=1500, initial_samples=20, low=-10.0, high=10.0)


def linear(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((D, K)), rng.standard_normal(K)


def exact_distances(model, X: np.ndarray) -> np.ndarray:
    """The L2 distance from each row to the nearest point labelled otherwise (no box in the way)."""
    W, b = model
    scores = X @ W + b
    y = scores.argmax(axis=1)
    margins = np.take_along_axis(scores, y[:, None], axis=1) - scores  # (n, K), 0 for y itself
    norms = np.linalg.norm(W[:, y].T[:, :, None] - W[None], axis=1)  # ||w_y - w_j||
    return np.where(np.arange(K) == y[:, None], np.inf, margins / np.maximum(norms, 1e-12)).min(axis=1)


def labeller(model):
    W, b = model
    return lambda points: (points @ W + b).argmax(axis=-1)


@pytest.fixture
def points():
    return np.random.default_rng(1).uniform(-1, 1, (60, D))


def test_distances_are_the_true_ones_from_above_within_the_budget(points):
    model = linear(0)
    y = labeller(model)(points)
    target = CallableTarget(lambda X: np.eye(K)[labeller(model)(X)], K, output=OutputFormat(label_only=True))
    found, spent = SEARCH.distances(lambda P: labels(target, P), points, y)
    truth = exact_distances(model, points)
    assert spent.max() <= 1500 and target.queries == spent.sum()
    assert np.all(found >= truth - 1e-9)  # every distance is to a point the model labels otherwise
    # most searches reach the nearest boundary; some settle on another class's, farther (a local optimum)
    assert np.median(found / truth) < 1.05 and np.mean(found / truth < 1.2) >= 0.7


def test_more_queries_find_closer_boundaries(points):
    model = linear(2)
    y = labeller(model)(points)
    few, _ = HopSkipJump(max_queries=120, initial_samples=20, low=-10.0, high=10.0).distances(labeller(model), points, y)
    many, _ = HopSkipJump(max_queries=800, initial_samples=20, low=-10.0, high=10.0).distances(labeller(model), points, y)
    assert np.mean(many) < np.mean(few)


def test_one_call_searches_each_model_on_its_own(points):
    """``labels_of`` over a leading models axis, model ``i`` labelling ``points[i]`` (``Ensemble.labels_each``)."""
    models = [linear(3), linear(4)]
    y = labeller(models[0])(points)

    def labels_each(P: np.ndarray) -> np.ndarray:
        return np.stack([labeller(model)(P[i]) for i, model in enumerate(models)])

    found, _ = SEARCH.distances(labels_each, np.broadcast_to(points, (2, *points.shape)), y, chunk=16)
    for i, model in enumerate(models):
        correct = labeller(model)(points) == y
        truth = exact_distances(model, points)
        assert np.all(found[i][~correct] == 0.0)
        assert np.median(found[i][correct] / truth[correct]) < 1.05
