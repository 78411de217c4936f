"""Query streams shared by the bench and the detector benchmark: benign clients (natural variations
of the defender's own data) and synthetic extraction streams (Jacobian augmentation, line search)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from benchmarks import models
from guard.detectors.calibration import Stream

Oracle = Callable[[np.ndarray], np.ndarray]
"""The target's labelling of a batch of queries: features ``(n, d)`` -> labels ``(n,)``."""


def jacobian_stream(
    oracle: Oracle,
    seeds: np.ndarray,
    n_classes: int,
    rounds: int = 3,
    step: float = 0.1,
    seed: int = 0,
) -> Stream:
    """Papernot et al.'s Jacobian-based dataset augmentation ("Practical Black-Box Attacks against
    Machine Learning", AsiaCCS 2017, Algorithm 1): query the seeds, then each round train a
    substitute on everything labelled so far and query ``x + step * sign(dF_{O(x)}/dx)`` for every
    ``x`` queried so far, clipped to [0, 1]."""
    queries, labels = [seeds], [oracle(seeds)]
    for round_ in range(rounds):
        known, known_labels = np.concatenate(queries), np.concatenate(labels)
        substitute = models.train_target(
            "softmax", known, known_labels, n_classes, seed=seed + round_, epochs=30
        )
        inputs = torch.as_tensor(known, dtype=torch.float32).requires_grad_(True)
        picked = substitute(inputs).gather(1, torch.as_tensor(known_labels).view(-1, 1))
        (gradient,) = torch.autograd.grad(picked.sum(), inputs)
        new = np.clip(known + step * np.sign(gradient.numpy()), 0.0, 1.0).astype(np.float32)
        queries.append(new)
        labels.append(oracle(new))
    return np.concatenate(queries), np.concatenate(labels)


def line_search_stream(
    oracle: Oracle, starts: np.ndarray, ends: np.ndarray, tolerance: float = 1e-3
) -> Stream:
    """Boundary search by bisection between pairs of points (as in Tramer et al.'s extraction of
    decision boundaries, USENIX Security 2016, section 4): per pair, its two ends, then midpoints
    until the boundary is located within ``tolerance`` of the segment; pairs one after another."""
    low, high = np.zeros(len(starts)), np.ones(len(starts))
    start_labels, end_labels = oracle(starts), oracle(ends)
    steps = [(starts, start_labels), (ends, end_labels)]
    while (high - low).max() > tolerance:
        middle = (low + high) / 2
        points = (starts + middle[:, None] * (ends - starts)).astype(np.float32)
        answers = oracle(points)
        on_start_side = answers == start_labels
        low, high = np.where(on_start_side, middle, low), np.where(on_start_side, high, middle)
        steps.append((points, answers))
    features = np.stack([points for points, _ in steps], axis=1)  # (pairs, steps, d)
    labels = np.stack([answers for _, answers in steps], axis=1)
    return features.reshape(-1, starts.shape[1]), labels.reshape(-1)


def natural_variations(
    pool: np.ndarray, image_shape: tuple[int, int], n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` natural-looking samples: random images from ``pool`` under a small random affine
    warp (rotation within 10 degrees, scale 0.9-1.1, shift within 1 pixel), a contrast change
    (0.8-1.2) and mild Gaussian noise (0.03), clipped to [0, 1]."""
    images = pool[rng.integers(len(pool), size=n)].reshape(n, *image_shape)
    angles = np.deg2rad(rng.uniform(-10, 10, n))
    scales = rng.uniform(0.9, 1.1, n)
    shifts = rng.uniform(-1, 1, (n, 2))
    centre = (np.asarray(image_shape) - 1) / 2
    warped = np.empty_like(images)
    for i, image in enumerate(images):
        cos, sin = np.cos(angles[i]) / scales[i], np.sin(angles[i]) / scales[i]
        matrix = np.array([[cos, -sin], [sin, cos]])
        warped[i] = ndimage.affine_transform(
            image, matrix, centre - matrix @ centre + shifts[i], order=1, mode="constant"
        )
    noisy = warped * rng.uniform(0.8, 1.2, (n, 1, 1)) + rng.normal(0, 0.03, warped.shape)
    return np.clip(noisy, 0.0, 1.0).reshape(n, -1).astype(np.float32)


def benign_streams(
    oracle: Oracle,
    pool: np.ndarray,
    image_shape: tuple[int, int],
    clients: int,
    per_client: int,
    seed: int,
    prefix: str = "benign",
) -> dict[str, Stream]:
    """``clients`` benign clients, each sending ``per_client`` natural variations of ``pool``."""
    rng = np.random.default_rng(seed)
    streams = {}
    for client in range(clients):
        features = natural_variations(pool, image_shape, per_client, rng)
        streams[f"{prefix}-{client}"] = (features, oracle(features))
    return streams


def spread(stream: Stream, keys: int, prefix: str = "sybil") -> dict[str, Stream]:
    """The same stream sent round-robin through ``keys`` API keys (a Sybil attacker)."""
    features, labels = stream
    return {f"{prefix}-{key}": (features[key::keys], labels[key::keys]) for key in range(keys)}


def benign_rows(
    oracle: Oracle, pool: np.ndarray, clients: int, per_client: int, seed: int, prefix: str = "benign"
) -> dict[str, Stream]:
    """``clients`` benign clients, each sending ``per_client`` records of ``pool`` with mild Gaussian
    noise (0.03), clipped to [0, 1]: the tabular counterpart of ``benign_streams``."""
    rng = np.random.default_rng(seed)
    streams = {}
    for client in range(clients):
        features = pool[rng.integers(len(pool), size=per_client)]
        features = np.clip(features + rng.normal(0, 0.03, features.shape), 0, 1).astype(np.float32)
        streams[f"{prefix}-{client}"] = (features, oracle(features))
    return streams
