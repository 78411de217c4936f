"""Each defence's adaptive membership attack beats that defence in the LiRA game (``membership_game``:
an MLP trained on a random half of digits, every record a candidate), where the attack the defence
was designed against does not; and the low-FPR statistics cannot flatter a defence."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from attacks import scoring
from attacks.hopskipjump import HopSkipJump
from attacks.membership import LabelOnlyAttack, LiRA
from attacks.observations import (AveragedNoise, BoundaryDistance, HopSkipJumpDistance, InvertedReverseSigmoid,
                                  LabelRobustness, RoundedInterval)
from attacks.reverse_sigmoid import estimate_reverse_sigmoid, invert_reverse_sigmoid, reverse_sigmoid
from attacks.targets import CallableTarget, OutputFormat
from benchmarks import models
from guard.outputs import Pipeline

REFERENCES = 8


@pytest.fixture(scope="module")
def references(digits):
    return LiRA(REFERENCES).train_references(digits.X, digits.y, digits.n_classes)


@pytest.fixture(scope="module")
def undefended(digits, membership_game, references) -> float:
    """Undefended LiRA's TPR at 1% FPR with these references: what an adaptive attack should get back."""
    model, member = membership_game
    return _tpr(_run(LiRA(REFERENCES), _defended(model, []), digits, member, references))


def _defended(model, specs: list[str], label_only: bool = False) -> CallableTarget:
    """The model's answers through the guard's own output defences, as the API would send them."""
    pipeline = Pipeline.from_specs(specs, secret=b"test-secret")
    return CallableTarget(lambda X: pipeline(models.predict_proba(model, X), X), 10,
                          output=OutputFormat(label_only=label_only))


def _tpr(result) -> float:
    return result.metrics["tpr_at_1pct_fpr"]


def _run(attack, target, digits, member, references):
    return attack.run(target, digits.X, digits.y, is_member=member, references=references)


def test_calibrated_label_only_attack_beats_label_only_answers(digits, membership_game, references, undefended):
    model, member = membership_game
    target = _defended(model, ["label_only"], label_only=True)
    calibrated = _run(LiRA(REFERENCES, statistic=LabelRobustness(16)), target, digits, member, references)
    uncalibrated = LabelOnlyAttack("noise", n_noise=16).run(target, digits.X, digits.y, is_member=member)
    assert _tpr(calibrated) >= 0.6 * undefended > 2 * _tpr(uncalibrated)
    assert calibrated.queries == 16 * len(digits.y)


def test_calibrated_boundary_distance_beats_the_uncalibrated_one(digits, membership_game, references):
    """Each reference model searches the boundary along the same random directions as the target."""
    model, member = membership_game
    target = _defended(model, ["label_only"], label_only=True)
    calibrated = _run(LiRA(REFERENCES, statistic=BoundaryDistance()), target, digits, member, references)
    uncalibrated = LabelOnlyAttack("boundary").run(target, digits.X, digits.y, is_member=member)
    assert _tpr(calibrated) > 2 * max(_tpr(uncalibrated), 0.01)
    assert calibrated.queries == (8 * 10 + 1) * len(digits.y)


def test_calibrated_hopskipjump_distance_beats_the_uncalibrated_one(digits, membership_game, references):
    """Li & Zhang's boundary distance from HopSkipJump, each reference model running the same search."""
    model, member = membership_game
    target = _defended(model, ["label_only"], label_only=True)
    search = HopSkipJump(max_queries=120, initial_samples=20)
    calibrated = _run(LiRA(REFERENCES, statistic=HopSkipJumpDistance(search)), target, digits, member, references)
    uncalibrated = LabelOnlyAttack("hopskipjump", hopskipjump=search).run(target, digits.X, digits.y, is_member=member)
    assert _tpr(calibrated) > 2 * max(_tpr(uncalibrated), 0.01)
    assert calibrated.queries == uncalibrated.queries == calibrated.metrics["queries_per_candidate"] * len(digits.y)
    assert calibrated.metrics["queries_per_candidate"] <= 120


def test_inverting_the_reverse_sigmoid_gives_back_lira(digits, membership_game, references, undefended):
    model, member = membership_game
    target = _defended(model, ["reverse_sigmoid:0.7:0.4"])
    plain = _run(LiRA(REFERENCES), target, digits, member, references)
    inverted = _run(LiRA(REFERENCES, statistic=InvertedReverseSigmoid(0.7, 0.4)), target, digits, member,
                    references)
    assert _tpr(inverted) >= 0.8 * undefended > 2 * _tpr(plain)
    assert inverted.metrics["inverted"] > 0.99


def test_inverting_with_estimated_parameters_gives_back_lira(digits, membership_game, references, undefended):
    """Kerckhoffs: the attacker knows the defence is a reverse sigmoid, not its beta and gamma."""
    model, member = membership_game
    target = _defended(model, ["reverse_sigmoid:0.7:0.4"])
    estimated = _run(LiRA(REFERENCES, statistic=InvertedReverseSigmoid()), target, digits, member, references)
    assert estimated.metrics["beta"] == pytest.approx(0.7, rel=0.02)
    assert estimated.metrics["gamma"] == pytest.approx(0.4, rel=0.05)
    assert _tpr(estimated) >= 0.8 * undefended
    assert estimated.queries == len(digits.y)


@pytest.mark.parametrize("beta, gamma", [(0.73, 0.37), (0.33, 0.23)])
def test_reverse_sigmoid_parameters_are_estimated_from_300_answers(digits, digits_mlp, references, beta, gamma):
    p = models.predict_proba(digits_mlp, digits.X[:300])
    answers = Pipeline.from_specs([f"reverse_sigmoid:{beta}:{gamma}"])(p)
    estimated = estimate_reverse_sigmoid(answers, references.predict_proba(digits.X[:300]))
    assert estimated == pytest.approx((beta, gamma), rel=0.05)


def test_reverse_sigmoid_inversion_recovers_the_confidences_exactly(digits, digits_mlp):
    p = models.predict_proba(digits_mlp, digits.X[:300])
    answers = Pipeline.from_specs(["reverse_sigmoid:0.7:0.4"])(p)
    np.testing.assert_allclose(reverse_sigmoid(p, 0.7, 0.4), answers, atol=1e-9)
    recovered = invert_reverse_sigmoid(answers, 0.7, 0.4)
    assert np.mean(np.abs(recovered - p).max(axis=1) < 1e-6) > 0.95


def test_averaging_fresh_noise_beats_the_noise_defence(digits, membership_game, references, undefended):
    """Noise keyed on the exact float64 input averages away over inputs a few ulps apart (the model
    sees the same float32 input): the attack finds the scale that draws fresh noise and gets the
    undefended attack's success back."""
    model, member = membership_game
    target = _defended(model, ["noise:0.5"])
    averaged = _run(LiRA(REFERENCES, statistic=AveragedNoise(0.5, repeats=16)), target, digits, member,
                    references)
    assert averaged.metrics["repeats"] == 16 and averaged.metrics["step"] > 0
    assert _tpr(averaged) >= 0.8 * undefended


def test_averaging_asks_once_when_the_noise_cannot_be_redrawn(digits, membership_game, references):
    """Noise keyed on the input rounded to 6 decimals: moving it by 1e-12 redraws nothing."""
    model, member = membership_game

    def keyed(X):
        seeds = [int.from_bytes(hashlib.sha256(np.round(x, 6).tobytes()).digest()[:8], "little") for x in X]
        z = np.stack([np.random.default_rng(seed).standard_normal(10) for seed in seeds])
        noisy = models.predict_proba(model, X) * np.exp(0.5 * z)
        return noisy / noisy.sum(axis=1, keepdims=True)

    result = _run(LiRA(REFERENCES, statistic=AveragedNoise(0.5, repeats=16, steps=(1e-12,))),
                  CallableTarget(keyed, 10), digits, member, references)
    assert result.metrics["repeats"] == 1 and result.queries == len(digits.y) + 4 * 8


def test_rounding_aware_lira_scores_the_interval(digits, membership_game, references, undefended):
    model, member = membership_game
    target = _defended(model, ["round:1"])
    aware = _run(LiRA(REFERENCES, statistic=RoundedInterval(1)), target, digits, member, references)
    assert _tpr(aware) >= 0.6 * undefended
    assert np.isfinite(aware.artefacts["scores"]).all()


def test_tpr_at_fpr_breaks_ties_at_random_so_few_scores_are_never_below_chance():
    rng = np.random.default_rng(0)
    is_member = rng.random(10_000) < 0.5
    scores = rng.integers(0, 10, size=10_000)  # ten distinct scores, no signal
    measures = scoring.membership_measures(scores, is_member)
    assert measures["tpr_at_1pct_fpr"] == pytest.approx(0.01, abs=0.004)
    assert measures["members"] + measures["non_members"] == 10_000


def test_clopper_pearson_interval():
    low, high = scoring.clopper_pearson(9, 900)
    assert low < 0.01 < high and low == pytest.approx(0.00458, abs=1e-4) and high == pytest.approx(0.01892, abs=1e-4)
    assert scoring.clopper_pearson(0, 50)[0] == 0.0 and scoring.clopper_pearson(50, 50)[1] == 1.0
