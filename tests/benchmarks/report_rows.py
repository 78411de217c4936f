"""Report rows built by hand, shaped as ``benchmarks.cells.row`` writes them, for tests that render a
report without running a bench: extraction with agreement curves, membership with ROC curves and
member counts (and a DP-SGD target), inversion with real digits as the victims' inputs."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from benchmarks.scenarios import THREAT_MODELS

Row = dict[str, Any]
MEMBERS = 900
TEST_POINTS = 360
SPECS = {"none": {"output": [], "dp_epsilon": None}, "round:1": {"output": ["round:1"]},
         "label_only": {"output": ["label_only"]}, "monitoring": {"monitoring": True},
         "dp-eps8": {"dp_epsilon": 8.0}}


def measure(value: float) -> dict[str, Any]:
    return {"mean": value, "std": 0.0, "values": [value]}


def row(defence: str, family: str, attack: str, primary: str, success: float, chance: float,
        accuracy: float = 0.96, **extra) -> Row:
    """One finished attack on digits/softmax, seed 0."""
    return {"dataset": "digits", "model": "softmax", "defence": defence, "attack": attack, "family": family,
            "adaptive": False, "status": "ok", "reason": "", "primary": primary, "chance": chance, "seeds": [0],
            "metrics": {primary: measure(success), **extra.pop("metrics", {})}, "queries": measure(1000),
            "flagged_at": [None], "blocked_at": [None], "attacker_cost": None, "dp_audit": None, "wall_time_s": measure(1.0),
            "utility": {"test_accuracy": measure(accuracy), "label_change_rate": measure(0.96 - accuracy + 0.001),
                        "benign_flagged": measure(0.0), "target_train_accuracy": measure(0.98),
                        "target_held_out_accuracy": measure(0.96)},
            "curves": {}, "images": {}, **extra}


def extraction(defence: str, agreement: float, accuracy: float = 0.96) -> Row:
    queries = [10.0, 30.0, 100.0, 300.0, 1000.0]
    curve = {"x": queries, "y": [agreement * (1 - 0.5 ** (i + 1)) for i in range(len(queries))]}
    return row(defence, "extraction", "copycat", "agreement_test", agreement, 0.111, accuracy,
               curves={"agreement_vs_queries": curve}, metrics={"test_points": measure(TEST_POINTS)})


def membership(defence: str, tpr: float, accuracy: float = 0.96, power: float = 0.5) -> Row:
    fpr = np.logspace(-3, 0, 60)
    curve = {"x": fpr.tolist(), "y": np.minimum(1.0, fpr ** power).tolist()}
    advantage = float(np.max(curve["y"] - fpr))
    return row(defence, "membership", "lira-online", "tpr_at_1pct_fpr", tpr, 0.01, accuracy, curves={"roc": curve},
               metrics={"members": measure(MEMBERS), "non_members": measure(MEMBERS),
                        "advantage": measure(advantage), "epsilon_lower_bound": measure(0.4)})


def inversion(defence: str, gain: float, noise: float) -> Row:
    digits = load_digits()
    first = [int(np.flatnonzero(digits.target == label)[0]) for label in range(10)]
    victims = digits.data[first] / 16.0
    means = np.stack([digits.data[digits.target == label].mean(axis=0) / 16.0 for label in range(10)])
    reconstructions = np.clip(victims + np.random.default_rng(0).normal(0, noise, victims.shape), 0, 1)
    return row(defence, "inversion", "inverse-model", "lineup", 0.2 + gain, 0.2,
               metrics={"reference_lineup": measure(0.2), "advantage_lineup": measure(gain)},
               images={"victims' inputs": victims.tolist(), "no-model reference": means.tolist(),
                       "reconstructions": reconstructions.tolist()})


def rows() -> list[Row]:
    """A small run: output defences change little, DP-SGD brings membership to chance at an accuracy cost."""
    return [extraction("none", 0.99), extraction("round:1", 0.98), extraction("label_only", 0.95),
            extraction("monitoring", 0.99), extraction("dp-eps8", 0.97, 0.93),
            membership("none", 0.08), membership("round:1", 0.079), membership("label_only", 0.075),
            membership("monitoring", 0.08), membership("dp-eps8", 0.009, 0.93, power=1.0),
            inversion("none", 0.5, 0.1), inversion("round:1", 0.45, 0.15), inversion("label_only", 0.3, 0.3)]


def config() -> dict[str, Any]:
    return {"seeds": [0], "datasets": ["digits"], "command": "constructed rows", "defence_specs": SPECS,
            "dp_delta": {"digits": 1e-5}, "threat_models": THREAT_MODELS, "image_shapes": {"digits": [8, 8]}}
