"""The report's verdicts on constructed rows: every verdict carries intervals, "reduces" only where
they separate, the same attacks compared on both sides, the summary's closest defence worth naming."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import grid
from benchmarks.verdicts import base_attack, chance_interval, client_loss, interval, summary, verdicts


def _measure(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": list(values)}


def _row(defence: str, values: float | list[float], *, attack: str = "copycat", family: str = "extraction",
         primary: str = "agreement_test", trials: int = 500, chance: float = 0.1, accuracy: float = 0.9,
         status: str = "ok", reason: str = "", reference: float | None = None, samples=None,
         changed: float = 0.0) -> dict:
    values = [values] if np.isscalar(values) else list(values)
    counts = {"agreement_test": "test_points", "tpr_at_1pct_fpr": "members", "accuracy": "records"}
    metrics = {} if status != "ok" else {primary: _measure(values)}
    if status == "ok" and primary in counts and samples is None:
        metrics[counts[primary]] = _measure([trials] * len(values))
    if reference is not None and status == "ok":
        metrics[f"reference_{primary}"] = _measure([reference] * len(values))
        metrics[f"advantage_{primary}"] = _measure([v - reference for v in values])
    return {"dataset": "d", "model": "m", "family": family, "defence": defence, "attack": attack,
            "status": status, "reason": reason, "primary": primary, "seeds": list(range(len(values))),
            "chance": reference if reference is not None else chance, "metrics": metrics,
            "samples": samples or [{} for _ in values],
            "utility": {"test_accuracy": {"mean": accuracy}, "label_change_rate": {"mean": changed}}}


def _only(findings: list[dict], defence: str) -> dict:
    [finding] = [f for f in findings if f["defence"] == defence]
    return finding


def test_a_rate_interval_covers_its_binomial_spread_and_the_seeds_spread():
    low, high = interval(_row("none", 0.9, trials=500))
    assert low < 0.9 < high and 0.02 < high - low < 0.06  # about 1.96 * sqrt(0.9 * 0.1 / 500) each side
    one_seed = interval(_row("none", 0.9, trials=5000))
    seeds_apart = interval(_row("none", [0.85, 0.95], trials=5000))
    assert seeds_apart[1] - seeds_apart[0] > 3 * (one_seed[1] - one_seed[0])
    assert interval(_row("none", 1.0, trials=500))[0] < 1.0  # a perfect score still has an interval


def test_reduces_only_where_the_intervals_separate():
    undefended = _row("none", 0.90)
    overlapping = _only(verdicts([undefended, _row("x", 0.87)]), "x")
    assert overlapping["interval"][1] >= overlapping["undefended_interval"][0]
    assert overlapping["outcome"] == "does not help" and "reduces" not in overlapping["verdict"]
    separated = _only(verdicts([undefended, _row("x", 0.70)]), "x")
    assert separated["interval"][1] < separated["undefended_interval"][0]
    assert separated["outcome"] == "reduces"
    assert separated["verdict"].startswith("reduces it from copycat 0.900 [") and "to copycat 0.700 [" in separated["verdict"]


def test_chance_is_credited_only_within_a_chance_attacker_s_interval():
    findings = verdicts([_row("none", 0.9), _row("a", 0.098), _row("b", 0.16)])
    assert _only(findings, "a")["outcome"] == "brings it to chance"
    assert _only(findings, "b")["outcome"] == "reduces"  # well above chance's interval
    low, high = chance_interval(_row("a", 0.098))
    assert low < 0.1 < high


def test_no_verdict_when_the_attack_fails_undefended():
    finding = _only(verdicts([_row("none", 0.11, trials=100), _row("x", 0.1, trials=100)]), "x")
    assert finding["outcome"] == "no verdict" and "fails undefended" in finding["verdict"]


def test_an_attack_the_defence_blocks_is_not_compared_with_another_attack():
    """Equation solving undefended (1.0) is never set against a learned copy under labels only
    (issue 27: "reduces it from 1 to 0.96"): the copies are compared with the copies."""
    rows = [_row("none", 1.0, attack="equation-solving"), _row("none", 0.962, attack="copycat"),
            _row("label_only", 0.0, attack="equation-solving", status="not-applicable",
                 reason="needs probabilities; the endpoint answers labels only"),
            _row("label_only", 0.958, attack="copycat")]
    finding = _only(verdicts(rows), "label_only")
    assert finding["baseline_attack"] == "copycat" and finding["strongest_attack"] == "copycat"
    assert finding["outcome"] == "does not help"
    assert "equation-solving (needs probabilities" in finding["verdict"] and "1.000 undefended" in finding["verdict"]


def test_an_attack_the_defence_weakens_is_named_but_not_compared_with_another_attack():
    """Rounding lowers equation solving below a learned copy, which it does not lower: the verdict
    compares the copy with itself ("does not help") and names what equation solving lost."""
    rows = [_row("none", 1.0, attack="equation-solving"), _row("none", 0.978, attack="knockoff-adaptive"),
            _row("round:1", 0.80, attack="equation-solving-rounding-aware"),
            _row("round:1", 0.973, attack="knockoff-adaptive")]
    finding = _only(verdicts(rows), "round:1")
    assert finding["baseline_attack"] == finding["strongest_attack"] == "knockoff-adaptive"
    assert finding["outcome"] == "does not help" and finding["undefended"] == pytest.approx(0.978)
    assert finding["lowered"]["equation-solving"].startswith("from 1.000 [")
    assert "to 0.800 [" in finding["lowered"]["equation-solving"]


def test_chance_is_judged_against_the_strongest_undefended_attack():
    """DP brings LiRA to chance; the threshold attack, weak undefended, is at chance too."""
    membership = {"family": "membership", "primary": "tpr_at_1pct_fpr", "trials": 900, "chance": 0.01}
    rows = [_row("none", 0.20, attack="lira-online", **membership), _row("none", 0.015, attack="threshold", **membership),
            _row("dp-eps1", 0.009, attack="lira-online", **membership),
            _row("dp-eps1", 0.010, attack="threshold", **membership)]
    finding = _only(verdicts(rows), "dp-eps1")
    assert finding["outcome"] == "brings it to chance" and finding["baseline_attack"] == "lira-online"


def test_an_adapted_attack_is_compared_with_the_attack_it_adapts():
    rows = [_row("none", 0.20, attack="lira-online", family="membership", primary="tpr_at_1pct_fpr", trials=900,
                 chance=0.01),
            _row("none", 0.05, attack="threshold", family="membership", primary="tpr_at_1pct_fpr", trials=900,
                 chance=0.01),
            _row("label_only", 0.08, attack="label-only-calibrated", family="membership",
                 primary="tpr_at_1pct_fpr", trials=900, chance=0.01)]
    finding = _only(verdicts(rows), "label_only")
    assert finding["baseline_attack"] == "lira-online" and finding["outcome"] == "reduces"


def test_one_seed_verdicts_say_they_are_indicative():
    assert _only(verdicts([_row("none", 0.9), _row("x", 0.5)]), "x")["verdict"].endswith("(indicative: one seed)")
    two = _only(verdicts([_row("none", [0.9, 0.9]), _row("x", [0.5, 0.5])]), "x")
    assert not two["indicative"] and "indicative" not in two["verdict"]


def test_inversion_intervals_resample_victims():
    """Per-reconstruction advantages: resampled by victim (every reconstruction of a drawn victim), so
    4 victims of 10 reconstructions each leave a wider interval than 40 victims of one each."""
    gains = np.repeat([0.6, 0.5, 0.1, 0.0], 10) + np.random.default_rng(0).normal(0, 0.01, 40)

    def row(victims: np.ndarray) -> dict:
        samples = [{"advantage_lineup_accuracy": gains.tolist(), "victims": victims.tolist()}]
        return _row("none", float(gains.mean()) + 0.2, family="inversion", primary="lineup_accuracy",
                    reference=0.2, samples=samples)

    few, many = interval(row(np.repeat([0, 1, 2, 3], 10))), interval(row(np.arange(40)))
    assert few[0] < gains.mean() < few[1] and many[0] < gains.mean() < many[1]
    assert few[1] - few[0] > 1.5 * (many[1] - many[0])


def test_attribute_inference_is_judged_on_its_advantage_and_summarised():
    rows = [_row("none", 0.80, attack="map-attribute", family="attribute", primary="accuracy", reference=0.70,
                 trials=2000),
            _row("dp-eps1", 0.695, attack="map-attribute", family="attribute", primary="accuracy", reference=0.70,
                 trials=2000, accuracy=0.85)]
    finding = _only(verdicts(rows), "dp-eps1")
    assert finding["undefended"] == pytest.approx(0.10) and finding["undefended_interval"][0] > 0.07
    assert finding["outcome"] == "brings it to the no-model reference"
    [line] = summary([finding], {"defence_specs": {"dp-eps1": {"dp_epsilon": 1.0}}})
    assert line["family"] == "attribute" and line["cheapest"] == "dp-eps1"
    assert line["accuracy_cost"] == pytest.approx(0.05)


def test_summary_names_only_a_closest_defence_that_lowers_the_attack_beyond_its_interval():
    config = {"defence_specs": {"dp-eps8": {"dp_epsilon": 8.0}, "round:1": {"output": ["round:1"]}}}
    rows = [_row("none", 0.96), _row("round:1", 0.95, accuracy=0.9), _row("dp-eps8", 0.80, accuracy=0.735)]
    [line] = summary(verdicts(rows), config)
    assert line["cheapest"] == "none does" and line["closest"] == "dp-eps8"
    assert line["accuracy_cost"] == pytest.approx(0.165) and line["still"].startswith("the copy still agrees 80.0% [")
    # a DP row that lowers agreement by less than the intervals is not "closest" (issue 27: 16.5 points for 5)
    [line] = summary(verdicts(rows[:2] + [_row("dp-eps8", 0.935, accuracy=0.735, trials=200)]), config)
    assert line["closest"] is None and line["accuracy_cost"] is None
    assert line["still"].startswith("no defence lowers it beyond the intervals; undefended the copy still agrees 96.0%")


def test_summary_names_the_cheapest_defence_to_chance():
    config = {"defence_specs": {"dp-eps1": {"dp_epsilon": 1.0}, "dp-eps8": {"dp_epsilon": 8.0}}}
    membership = {"family": "membership", "primary": "tpr_at_1pct_fpr", "trials": 900, "chance": 0.01,
                  "attack": "lira-online"}
    rows = [_row("none", 0.07, **membership), _row("dp-eps1", 0.005, accuracy=0.8, **membership),
            _row("dp-eps8", 0.008, accuracy=0.85, **membership)]
    [line] = summary(verdicts(rows), config)
    assert line["cheapest"] == "dp-eps8" and line["accuracy_cost"] == pytest.approx(0.05) and line["still"] == "–"


def test_an_attack_at_chance_on_both_sides_is_not_taken_as_the_strongest_against_a_defence():
    # the bench's publicly pretrained DP MLP: LiRA 0.077 -> 0.008, and the loss threshold, at chance on
    # both sides, is nominally the strongest against the defence (0.011 against 0.009)
    membership = {"family": "membership", "primary": "tpr_at_1pct_fpr", "trials": 898, "chance": 0.01}
    rows = [_row("none", 0.077, attack="lira-online", **membership), _row("none", 0.009, attack="threshold", **membership),
            _row("dp", 0.008, attack="lira-online", **membership), _row("dp", 0.011, attack="threshold", **membership)]
    finding = _only(verdicts(rows), "dp")
    assert finding["strongest_attack"] == finding["baseline_attack"] == "lira-online"
    assert finding["outcome"] == "brings it to chance" and finding["defended"] == pytest.approx(0.008)


def test_a_defence_that_happens_to_gain_accuracy_is_not_ranked_before_one_that_changes_no_label():
    # a DP target better than an overfit non-DP one (the Fair-shaped survey: -6 points) costs nothing, but it
    # still changes labels; label_only changes none
    config = {"defence_specs": {"dp-eps8": {"dp_epsilon": 8.0}, "label_only": {"output": ["label_only"]}}}
    membership = {"family": "membership", "primary": "tpr_at_1pct_fpr", "trials": 900, "chance": 0.01,
                  "attack": "lira-online"}
    rows = [_row("none", 0.07, **membership), _row("dp-eps8", 0.008, accuracy=0.96, changed=0.08, **membership),
            _row("label_only", 0.009, **membership)]
    [line] = summary(verdicts(rows), config)
    assert line["cheapest"] == "label_only" and line["accuracy_cost"] == 0.0


def test_every_family_with_findings_gets_a_summary_line_even_without_a_verdict():
    [line] = summary(verdicts([_row("none", 0.11, trials=100), _row("x", 0.1, trials=100)]), {})
    assert line["cheapest"] == "no verdict" and "fails undefended" in line["still"]


def test_the_default_grid_runs_undefended_every_attack_a_defence_is_compared_with():
    config = grid.configure()
    undefended = set(grid.attacks_on(config, "none"))
    for defence in config.defences:
        assert {base_attack(a) for a in grid.attacks_on(config, defence)} <= undefended, defence


def test_clients_of_a_publicly_pretrained_dp_model_are_told_so():
    specs = {"defence_specs": {"dp-eps8-public": {"dp_epsilon": 8.0, "dp_public": True}, "dp-eps8": {"dp_epsilon": 8.0}}}
    assert client_loss("dp-eps8-public", specs).endswith("retrained with DP-SGD from one pretrained on public data")
    assert client_loss("dp-eps8", specs).endswith("retrained with DP-SGD")
