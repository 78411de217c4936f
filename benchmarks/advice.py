"""The report's "what to do" sentences, written from a run's summary and verdicts: per attack family,
which defence to turn on and what it costs, what the attacker still gets where no defence brings the
family to chance, and which defences the run shows cannot help."""
from __future__ import annotations

from typing import Any

from benchmarks import verdicts

Row = dict[str, Any]
FAMILY_NAMES = {"extraction": "model extraction (a copy of the model)",
                "membership": "membership inference (was this record in the training set?)",
                "inversion": "model inversion (reconstructing the victims' inputs)",
                "attribute": "attribute inference (a record's hidden attribute)"}


def _targets(lines: list[Row]) -> str:
    return ", ".join(f"{line['dataset']} {line['model']}" for line in lines)


def _cost(line: Row) -> str:
    cost, changed = line["accuracy_cost"], line["label_change_rate"]
    accuracy = "an unmeasured accuracy cost" if cost is None else f"{100 * cost:.1f} accuracy points"
    labels = "" if changed is None else f", {100 * changed:.1f}% of labels changed"
    return f"{accuracy}{labels}; clients lose {line['client_loss']}"


UNJUDGED = ("none does", "no verdict")
"""Summary lines that name no defence to turn on."""


def sentences(findings: list[Row], lines: list[Row]) -> list[str]:
    """One sentence per (family, recommended defence), per target where no defence brings the family
    to chance (the closest defence, its cost and what the attacker still gets), per family where the
    defences judged change nothing on any target, and per family whose attacks fail undefended."""
    out = []
    for (family,), members in verdicts.group(lines, ("family",)).items():
        name = FAMILY_NAMES.get(family, family)
        for (defence,), credited in verdicts.group([m for m in members if m["cheapest"] not in UNJUDGED],
                                                  ("cheapest",)).items():
            costs = (_cost(credited[0]) if len(credited) == 1 else
                     "; ".join(f"on {_targets([line])} {_cost(line)}" for line in credited))
            out.append(f"Against {name} on {_targets(credited)}, turn on {defence}: it brings the strongest attack "
                       f"({', '.join(sorted({line['attack'] for line in credited}))}) to chance. It costs {costs}.")
        for line in (m for m in members if m["cheapest"] == "none does"):
            closest = (f"The closest, {line['closest']}, costs {_cost(line)}, and the attacker still gets: "
                       if line.get("closest") else "The attacker gets: ")
            out.append(f"Against {name} on {_targets([line])}, no defence of this run brings the strongest attack "
                       f"to chance. {closest}{line['still']} ({line['attack']}).")
        for line in (m for m in members if m["cheapest"] == "no verdict"):
            out.append(f"No verdict on {name} for {_targets([line])}: {line['still'].removeprefix('no verdict: ')}.")
        useless = _never_helps([f for f in findings if f["family"] == family])
        if useless:
            out.append(f"{', '.join(useless)} did not reduce {family} on any target of this run: "
                       f"{'it does' if len(useless) == 1 else 'they do'} not protect against it.")
    summarised = {(line["family"], line["dataset"], line["model"]) for line in lines}
    failing = sorted({(f["family"], f["dataset"], f["model"]) for f in findings
                      if f["outcome"].startswith("no verdict") and (f["family"], f["dataset"], f["model"])
                      not in summarised})
    for family in sorted({f for f, _, _ in failing}):
        targets = ", ".join(f"{d} {m}" for f, d, m in failing if f == family)
        out.append(f"{FAMILY_NAMES.get(family, family).capitalize()} fails on the undefended {targets}: "
                   f"nothing to defend against there in this run.")
    return out


def _never_helps(findings: list[Row]) -> list[str]:
    """Defences judged on at least one target of a family and "does not help" on every one."""
    judged = [f for f in findings if not f["outcome"].startswith("no verdict")]
    outcomes = verdicts.group(judged, ("defence",))
    return sorted(defence for (defence,), group in outcomes.items()
                  if all(f["outcome"] == "does not help" for f in group))
