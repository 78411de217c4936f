"""The report's "what to do" sentences, written from a run's summary and verdicts: per attack family,
which defence to turn on and what it costs, what the attacker still gets where no defence brings the
family to chance, and which defences the run shows cannot help."""
from __future__ import annotations

from typing import Any

from benchmarks import report

Row = dict[str, Any]
FAMILY_NAMES = {"extraction": "model extraction (a copy of the model)",
                "membership": "membership inference (was this record in the training set?)",
                "inversion": "model inversion (reconstructing the victims' inputs)",
                "attribute": "attribute inference (a record's hidden attribute)"}


def _targets(lines: list[Row]) -> str:
    return ", ".join(f"{line['dataset']} {line['model']}" for line in lines)


def _cost(line: Row) -> str:
    changed = line["label_change_rate"]
    labels = "" if changed is None else f", {100 * changed:.1f}% of labels changed"
    return f"{100 * line['accuracy_cost']:.1f} accuracy points{labels}; clients lose {line['client_loss']}"


def sentences(findings: list[Row], lines: list[Row]) -> list[str]:
    """One sentence per (family, recommended defence), per family without a defence to chance, and
    per family where defences that were measured change nothing on any target; families whose
    strongest attack fails undefended are said to need no defence."""
    out = []
    by_family = report._group(lines, ("family",))
    for (family,), members in by_family.items():
        name = FAMILY_NAMES.get(family, family)
        for (defence,), credited in report._group([m for m in members if m["cheapest"] != "none does"],
                                                  ("cheapest",)).items():
            costs = (_cost(credited[0]) if len(credited) == 1 else
                     "; ".join(f"on {_targets([line])} {_cost(line)}" for line in credited))
            out.append(f"Against {name} on {_targets(credited)}, turn on {defence}: it brings the strongest attack "
                       f"({', '.join(sorted({line['attack'] for line in credited}))}) to chance. It costs {costs}.")
        for line in (m for m in members if m["cheapest"] == "none does"):
            out.append(f"Against {name} on {_targets([line])}, no defence of this run brings the strongest attack "
                       f"to chance. The closest, {line['closest']}, costs {_cost(line)}, and the attacker "
                       f"still gets: {line['still']} ({line['attack']}).")
        useless = _never_helps([f for f in findings if f["family"] == family])
        if useless:
            out.append(f"{', '.join(useless)} did not reduce {family} on any target of this run: "
                       f"{'it does' if len(useless) == 1 else 'they do'} not protect against it.")
    failing = sorted({(f["family"], f["dataset"], f["model"]) for f in findings
                      if f["outcome"].startswith("no verdict")})
    for family in sorted({f for f, _, _ in failing}):
        targets = ", ".join(f"{d} {m}" for f, d, m in failing if f == family)
        out.append(f"{FAMILY_NAMES.get(family, family).capitalize()} fails on the undefended {targets}: "
                   f"nothing to defend against there in this run.")
    return out


def _never_helps(findings: list[Row]) -> list[str]:
    """Defences judged on at least one target of a family and "does not help" on every one."""
    judged = [f for f in findings if not f["outcome"].startswith("no verdict")]
    outcomes = report._group(judged, ("defence",))
    return sorted(defence for (defence,), group in outcomes.items()
                  if all(f["outcome"] == "does not help" for f in group))
