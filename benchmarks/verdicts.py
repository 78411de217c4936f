"""The report's judgements: for each dataset, model and attack family, whether each defence lowers
what the strongest attack gets (``verdicts``), and which defence to turn on (``summary``).

Every judgement rests on a 95% interval of the attack's measure (``interval``), resampled over both
sources of chance in a run: the seeds (split, training, attacker's randomness) and, within each seed,
the points the measure is taken on (test points for extraction, candidates for membership, records
for attribute inference, victims for inversion). A defence "reduces" an attack only when the two
intervals separate, and the two sides are always one attack: the strongest against the defence, and
the same attack undefended (an attack adapted to the defence's output format counts as the attack it
adapts), on the same test points. How to read them: ``docs/verdicts.md``.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from scipy.stats import beta

from benchmarks.scenarios import ATTACK_SPECS
from guard.outputs import read_spec

Row = dict[str, Any]

CONFIDENCE = 0.95
RESAMPLES = 4000
TRIALS = {"agreement_test": "test_points", "accuracy": "records", "tpr_at_1pct_fpr": "members",
          "tpr_at_0.1pct_fpr": "members"}
"""For a measure that is a rate, the metric counting its trials per seed (the rate's denominator)."""

REFERENCED_FAMILIES = ("inversion", "attribute")
"""Families measured beside a no-model reference (``benchmarks.scenarios.THREAT_MODELS``): judged on
the advantage over it."""

CREDITED = ("brings it to chance", "brings it to the no-model reference", "stops every attack")
"""Outcomes that let a defence be named the cheapest one to turn on."""

STILL_GETS = {
    "extraction": "the copy still agrees {value:.1%} {bounds} with the target (chance {chance:.1%})",
    "membership": "members are still found at TPR {value:.3f} {bounds} at 1% FPR (chance {chance:.3g})",
    "inversion": "reconstructions still beat the no-model reference by {value:.3f} {bounds} in line-up accuracy",
    "attribute": "the attribute is still inferred {value:.1%} {bounds} more often than without the model",
}


def group(rows: list[Row], keys: tuple[str, ...]) -> dict[tuple, list[Row]]:
    """``rows`` by the values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def success(row: Row) -> float:
    """The mean of a row's primary measure over its seeds."""
    return row["metrics"][row["primary"]]["mean"]


def advantage(row: Row) -> float:
    """What a row's attack gains over what the attacker has without it: for inversion and attribute
    inference the advantage over the no-model reference (its ``chance``), e.g. a reconstruction's
    line-up accuracy minus that of the attacker's own mean image; for the other families the margin
    over chance."""
    if row["family"] in REFERENCED_FAMILIES:
        measure = row["metrics"].get(f"advantage_{row['primary']}")
        if measure and measure["mean"] is not None:
            return measure["mean"]
    return success(row) - row["chance"]


def measure(row: Row) -> float:
    """The value a verdict judges: the advantage over the no-model reference for inversion and
    attribute inference, else the primary measure itself."""
    return advantage(row) if row["family"] in REFERENCED_FAMILIES else success(row)


def chance_level(row: Row) -> float:
    """``measure`` for an attacker who learns nothing from the model."""
    return 0.0 if row["family"] in REFERENCED_FAMILIES else row["chance"]


def base_attack(name: str) -> str:
    """The attack a row's attack is, for comparisons across defences: without its key count (the
    Sybil rows, "copycat (20 keys)"), and the attack it adapts to an output format if it does."""
    name = name.split(" (")[0]
    spec = ATTACK_SPECS.get(name)
    return spec.adapts if spec is not None and spec.adapts else name


def interval(row: Row) -> tuple[float, float] | None:
    """95% interval of ``measure`` over seeds and points (``_two_level``): for a rate over trials
    (agreement over test points, TPR over members, attribute accuracy over records) each seed's rate
    is drawn from its Jeffreys posterior, Beta(k + 1/2, n - k + 1/2) (Brown, Cai and DasGupta 2001),
    less the seed's no-model reference where there is one; for inversion each seed's victims are
    resampled (a cluster bootstrap: every reconstruction of a drawn victim). None when the row holds
    neither trial counts nor samples."""
    draws = _seed_draws(row)
    return None if draws is None else _two_level(draws)


def chance_interval(row: Row) -> tuple[float, float] | None:
    """The interval an attacker at chance would get on as many trials (for inversion: the row's own
    interval's half-width around 0); None where ``interval`` is None."""
    metrics, primary = row["metrics"], row["primary"]
    trials = (metrics.get(TRIALS.get(primary, ""), {}) or {}).get("values")
    reference = metrics.get(f"reference_{primary}") if row["family"] in REFERENCED_FAMILIES else None
    if row["status"] == "ok" and trials and reference:
        return _shift(_jeffreys(reference["mean"], float(np.sum(trials))), -reference["mean"])
    if row["status"] == "ok" and trials and row["family"] not in REFERENCED_FAMILIES:
        return _jeffreys(row["chance"], float(np.sum(trials)))
    bounds = interval(row)
    if bounds is None:
        return None
    half = (bounds[1] - bounds[0]) / 2
    return -half, half


def strongest(rows: list[Row]) -> Row | None:
    """The finished attack whose interval reaches highest above chance (the point value where there
    is no interval), or None if none finished."""
    done = [r for r in rows if r["status"] == "ok"]
    return max(done, key=_strength) if done else None


def verdicts(rows: list[Row]) -> list[Row]:
    """Per dataset, model, attack family and defence: the strongest attack against the defence, set
    against the same attack undefended (``base_attack``: adaptations to the output format count as
    the attack they adapt), with both intervals, the outcome and the utility cost.

    Outcomes: "no verdict" (the strongest undefended attack among those that ran against the defence
    fails: its interval reaches chance; or none of them ran undefended; or a row lacks an interval),
    "stops every attack" (every one was degraded or blocked), "brings it to chance" / "brings it to
    the no-model reference" (the strongest attack against the defence is within the interval an
    attacker at chance would get, below the strongest undefended one), "reduces" (the strongest
    attack against the defence lies below its own undefended interval) and "does not help" (their
    intervals overlap). An attack that reaches chance against the defence and fails undefended too
    shows nothing of the defence and is not taken as the strongest while another attack is left. Two
    different attacks are never compared: an undefended attack stronger than
    the one that is strongest against the defence is named in ``lowered`` (its value on each side),
    one that could not run against the defence in ``not_run``."""
    findings = []
    for (dataset, model, family), rows_of_family in group(rows, ("dataset", "model", "family")).items():
        by_defence = {defence: members for (defence,), members in group(rows_of_family, ("defence",)).items()}
        undefended = [r for r in by_defence.get("none", []) if r["status"] == "ok"]
        if not undefended:
            continue
        for defence, members in by_defence.items():
            ran = [r for r in members if r["status"] in ("ok", "stopped")]
            if defence == "none" or not ran:
                continue
            by_attack = {a: [r for r in undefended if base_attack(r["attack"]) == a]
                         for a in {base_attack(r["attack"]) for r in ran}}
            strongest_undefended = strongest([r for rows_of in by_attack.values() for r in rows_of])
            defended = strongest([r for r in ran if not _uninformative(r, by_attack)] or ran)
            own = strongest(by_attack[base_attack(defended["attack"])]) if defended else None
            findings.append(_finding(dataset, model, family, defence, strongest_undefended, own, defended, ran,
                                     _lowered(by_attack, ran, own), {
                u["attack"]: _why_not_run(u, members) for u in undefended if base_attack(u["attack"]) not in by_attack}))
    return findings


def summary(findings: list[Row], config: dict[str, Any]) -> list[Row]:
    """Per dataset, model and attack family with findings: the cheapest defence (least accuracy lost, a
    measured gain counting as none, then fewest labels changed) credited with bringing the strongest attack to chance; when none is,
    the closest one worth naming: among those that reduce it beyond the intervals, the one that
    leaves the attacker least, with its cost; when none does, what the attacker gets undefended (and,
    when a single defence was judged, what it costs clients all the same); when the family has no
    verdict, why."""
    lines = []
    for (dataset, model, family), judged in group(findings, ("dataset", "model", "family")).items():
        line = {"dataset": dataset, "model": model, "family": family, "cheapest": "none does", "closest": None,
                "accuracy_cost": None, "label_change_rate": None, "benign_flagged": None, "client_loss": "–",
                "indicative": any(f["indicative"] for f in judged)}
        verdicted = [f for f in judged if f["outcome"] != "no verdict"]
        credited = [f for f in verdicted if f["outcome"] in CREDITED]
        reducing = [f for f in verdicted if f["outcome"] == "reduces"]
        if not verdicted:
            lines.append({**line, "cheapest": "no verdict", "attack": judged[0]["baseline_attack"] or "–",
                          "still": judged[0]["verdict"]})
            continue
        if credited or reducing:
            best = (min(credited, key=lambda f: (max(f["accuracy_cost"], 0.0), f["label_change_rate"] or 0.0))
                    if credited
                    else min(reducing, key=lambda f: f["defended"]))
            line.update({"accuracy_cost": best["accuracy_cost"], "label_change_rate": best["label_change_rate"],
                         "benign_flagged": best["benign_flagged"], "client_loss": client_loss(best["defence"], config),
                         "attack": best["strongest_attack"]})
            if credited:
                lines.append({**line, "cheapest": best["defence"], "still": "–"})
            else:
                lines.append({**line, "closest": best["defence"],
                              "still": _still(family, best["defended"], best["interval"], best["chance"])})
            continue
        strongest_undefended = max(verdicted, key=lambda f: f["undefended"])
        if len(verdicted) == 1:  # one defence judged (an audited endpoint): what it costs all the same
            line["client_loss"] = client_loss(verdicted[0]["defence"], config)
        lines.append({**line, "attack": strongest_undefended["baseline_attack"],
                      "still": "no defence lowers it beyond the intervals; undefended " + _still(
                          family, strongest_undefended["undefended"], strongest_undefended["undefended_interval"],
                          strongest_undefended["chance"])})
    return lines


def client_loss(defence: str, config: dict[str, Any]) -> str:
    """What legitimate clients lose under ``defence``, in words (for an audited endpoint: the answer
    format observed, ``benchmarks.audit``)."""
    spec = config.get("defence_specs", {}).get(defence, {})
    if spec.get("dp_epsilon") is not None:
        return ("nothing in the answers' format; the model is retrained with DP-SGD"
                + (" from one pretrained on public data" if spec.get("dp_public") else ""))
    if spec.get("monitoring"):
        return "nothing unless flagged: false alarms calibrated to 0.1% of benign streams"
    losses = {"round": "confidences beyond {0} decimals", "top_k": "all but the top {0} confidences",
              "label_only": "every confidence (labels only)", "noise": "exact confidences (noise of scale {0})",
              "reverse_sigmoid": "faithful confidences (deceptively perturbed)"}
    parts = []
    for stage in spec.get("output", ()):
        kind, arguments = read_spec(stage)
        parts.append(losses.get(kind, stage).format(*arguments))
    return "; ".join(parts) or "nothing"


def bounds_text(bounds: tuple[float, float] | None) -> str:
    """An interval as the report prints it: "[low, high]", or "(no interval)"."""
    return "(no interval)" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _finding(dataset: str, model: str, family: str, defence: str, strongest_undefended: Row | None,
             own: Row | None, defended: Row | None, ran: list[Row], lowered: dict[str, str],
             not_run: dict[str, str]) -> Row:
    """One verdict row: both sides with their intervals, the outcome and its sentence, the cost."""
    outcome, sentence, baseline = _outcome(family, strongest_undefended, own, defended)
    reference = defended or ran[0]
    chance_row = defended or baseline or ran[0]
    seeds = min(len(r["seeds"]) for r in [reference] + ([baseline] if baseline else []))
    if seeds < 2:
        sentence += " (indicative: one seed)"
    if lowered:
        sentence += "; stronger undefended, lowered: " + ", ".join(f"{a} {text}" for a, text in lowered.items())
    if not_run:
        sentence += "; not run against it: " + ", ".join(f"{a} ({why})" for a, why in not_run.items())
    utility = reference["utility"]
    base_accuracy = baseline["utility"]["test_accuracy"]["mean"] if baseline else None
    accuracy = utility["test_accuracy"]["mean"]
    return {
        "dataset": dataset, "model": model, "family": family, "defence": defence,
        "strongest_attack": reference["attack"], "baseline_attack": baseline["attack"] if baseline else None,
        "metric": (f"advantage in {reference['primary']} over the no-model reference"
                   if family in REFERENCED_FAMILIES else reference["primary"]),
        "chance": chance_level(chance_row),
        "chance_interval": chance_interval(chance_row) if chance_row["status"] == "ok" else None,
        "undefended": measure(baseline) if baseline else None,
        "undefended_interval": interval(baseline) if baseline else None,
        "defended": measure(defended) if defended else None, "interval": interval(defended) if defended else None,
        "outcome": outcome, "verdict": sentence, "seeds": seeds, "indicative": seeds < 2, "lowered": lowered,
        "not_run": not_run,
        "accuracy_cost": None if base_accuracy is None or accuracy is None else base_accuracy - accuracy,
        "label_change_rate": utility["label_change_rate"]["mean"],
        "benign_flagged": (utility.get("benign_flagged") or {}).get("mean"),
    }


def _outcome(family: str, strongest_undefended: Row | None, own: Row | None,
             defended: Row | None) -> tuple[str, str, Row | None]:
    """(outcome, the sentence the report prints with its intervals, the undefended row it compares)."""
    if strongest_undefended is None:
        return "no verdict", "no verdict: none of these attacks ran undefended", None
    best, best_bounds = _valued(strongest_undefended), interval(strongest_undefended)
    if best_bounds is None:
        return "no verdict", f"no verdict: no interval for the undefended {best}", strongest_undefended
    if best_bounds[0] <= chance_level(strongest_undefended):
        return "no verdict", f"no verdict: the attack fails undefended ({best} reaches chance)", strongest_undefended
    if defended is None:
        return ("stops every attack", f"stops every attack (degraded or blocked the attacker; undefended {best})",
                strongest_undefended)
    bounds, against = interval(defended), _valued(defended)
    if bounds is None:
        return "no verdict", f"no verdict: no interval for the defended {against}", own
    chance_bounds = chance_interval(defended)
    if chance_bounds is not None and bounds[1] <= chance_bounds[1] and bounds[1] < best_bounds[0]:
        outcome = "brings it to the no-model reference" if family in REFERENCED_FAMILIES else "brings it to chance"
        return (outcome, f"{outcome}: {against} (chance {bounds_text(chance_bounds)}) from {best}",
                strongest_undefended)
    own_bounds = interval(own) if own else None
    if own_bounds is None:
        return "no verdict", f"no verdict: {defended['attack']} has no undefended interval", own
    if bounds[1] < own_bounds[0]:
        return "reduces", f"reduces it from {_valued(own)} to {against}", own
    return "does not help", f"does not help: {against} against {_valued(own)} undefended (the intervals overlap)", own


def _uninformative(row: Row, by_attack: dict[str, list[Row]]) -> bool:
    """Whether ``row``'s attack reaches chance against the defence and its undefended run does too."""
    own = strongest(by_attack[base_attack(row["attack"])])
    return row["status"] == "ok" and own is not None and _reaches_chance(row) and _reaches_chance(own)


def _reaches_chance(row: Row) -> bool:
    bounds = interval(row)
    return bounds is not None and bounds[0] <= chance_level(row)


def _valued(row: Row) -> str:
    """A row's attack with its measure and interval, as a verdict names them."""
    return f"{row['attack']} {measure(row):.3f} {bounds_text(interval(row))}"


def _lowered(by_attack: dict[str, list[Row]], ran: list[Row], own: Row | None) -> dict[str, str]:
    """The attacks stronger undefended than the one strongest against the defence: each one's
    undefended and defended value ("stopped" when it did not finish against the defence)."""
    if own is None:
        return {}
    lowered = {}
    for attack, undefended in by_attack.items():
        before = strongest(undefended)
        if before is None or before is own or measure(before) <= measure(own):
            continue
        after = strongest([r for r in ran if base_attack(r["attack"]) == attack])
        lowered[attack] = (f"from {measure(before):.3f} {bounds_text(interval(before))} to "
                           + ("stopped" if after is None else f"{measure(after):.3f} {bounds_text(interval(after))}"))
    return lowered


def _why_not_run(undefended: Row, members: list[Row]) -> str:
    """Why an attack that ran undefended has no counterpart against a defence, with its undefended value."""
    reasons = [r["reason"] for r in members if base_attack(r["attack"]) == base_attack(undefended["attack"])
               and r["reason"]]
    value = f"{measure(undefended):.3f} undefended"
    return f"{reasons[0]}; {value}" if reasons else value


def _still(family: str, value: float, bounds: tuple[float, float] | None, chance: float) -> str:
    return STILL_GETS.get(family, "{value:.3f} {bounds} (chance {chance:.3g})").format(
        value=value, bounds=bounds_text(bounds), chance=chance)


def _strength(row: Row) -> float:
    bounds = interval(row)
    return (bounds[1] if bounds is not None else measure(row)) - chance_level(row)


def _seed_draws(row: Row) -> list[Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] | None:
    """Per seed, a sampler of ``measure`` (see ``interval``), or None without counts or samples."""
    if row["status"] != "ok":
        return None
    metrics, primary = row["metrics"], row["primary"]
    rates = metrics.get(primary, {}).get("values") or []
    trials = (metrics.get(TRIALS.get(primary, ""), {}) or {}).get("values") or []
    referenced = row["family"] in REFERENCED_FAMILIES
    offsets = (metrics.get(f"reference_{primary}") or {}).get("values") if referenced else [0.0] * len(rates)
    if rates and len(trials) == len(rates) and offsets and len(offsets) == len(rates):
        return [partial(_rate_draws, rate, n, offset) for rate, n, offset in zip(rates, trials, offsets)]
    name = f"advantage_{primary}"
    samples = [s for s in row.get("samples") or [] if s.get(name)]
    if referenced and samples and len(samples) == len(rates):
        return [partial(_victim_draws, np.asarray(s[name]), np.asarray(s["victims"])) for s in samples]
    return None


def _rate_draws(rate: float, trials: float, offset: float, rng: np.random.Generator,
                size: tuple[int, ...]) -> np.ndarray:
    hits = rate * trials
    return rng.beta(hits + 0.5, trials - hits + 0.5, size) - offset


def _victim_draws(values: np.ndarray, victims: np.ndarray, rng: np.random.Generator,
                  size: tuple[int, ...]) -> np.ndarray:
    """Means over resampled victims, every reconstruction of a drawn victim counted."""
    _, which = np.unique(victims, return_inverse=True)
    sums, counts = np.bincount(which, values), np.bincount(which)
    drawn = rng.integers(len(counts), size=(*size, len(counts)))
    return sums[drawn].sum(axis=-1) / counts[drawn].sum(axis=-1)


def _two_level(draws: list[Callable]) -> tuple[float, float]:
    """The central ``CONFIDENCE`` interval of the mean over seeds when the seeds are resampled (with
    replacement) and, in each drawn seed, its points (``draws``): a hierarchical bootstrap, seeded so
    that a report is reproducible."""
    rng = np.random.default_rng(0)
    seeds = len(draws)
    values = np.stack([draw(rng, (RESAMPLES, seeds)) for draw in draws])  # (seed drawn from, replicate, slot)
    chosen = rng.integers(seeds, size=(RESAMPLES, seeds))
    means = values[chosen, np.arange(RESAMPLES)[:, None], np.arange(seeds)].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def _jeffreys(rate: float, trials: float) -> tuple[float, float]:
    hits, tail = rate * trials, (1 - CONFIDENCE) / 2
    return float(beta.ppf(tail, hits + 0.5, trials - hits + 0.5)), float(beta.ppf(1 - tail, hits + 0.5,
                                                                                    trials - hits + 0.5))


def _shift(bounds: tuple[float, float], by: float) -> tuple[float, float]:
    return bounds[0] + by, bounds[1] + by
