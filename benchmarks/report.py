"""Write a benchmark run as ``results.json``, ``report.md`` and a self-contained ``report.html``.

``results.json`` schema (version 1)::

    {
      "schema": 1,
      "config": {...},                 # the exact run configuration: datasets, models, defences,
                                       # attacks, seeds, query budgets, package versions
      "rows": [{
        "dataset": str, "model": str, "defence": str, "attack": str,
        "family": "extraction" | "membership" | "inversion" | "attribute" | "ownership",
        "adaptive": bool,              # the attack was told the defence's public output format
        "status": "ok" | "not-applicable" | "failed",
        "reason": str,                 # why, when status is not "ok"
        "primary": str,                # the metric that measures this attack's success
        "chance": float,               # that metric's value for an attacker who learns nothing; for
                                       # inversion and attribute inference, the no-model reference's
                                       # (metrics then also hold reference_* and advantage_*)
        "seeds": [int, ...],
        "metrics": {name: {"mean": float, "std": float, "values": [float, ...]}},  # membership rows also
                                       # carry "members" and "non_members" (counts per seed)
        "queries": {"mean": ..., "std": ..., "values": [...]},
        "flagged_at": [int | null, ...],   # per seed: query count when monitoring first flagged,
        "blocked_at": [int | null, ...],   # ... and first blocked or throttled the attacker
        "attacker_cost": null | {      # the key-rotating Sybil attacker's rows (monitoring) only:
            "keys_used": {...}, "keys_burned": {...}, "queries_spent": {...},  # per-seed summaries;
            "queries_lost": {...}, "natural_queries": {...}, "hours": {...},   # spent = resent rows too
            "finished": int,           # seeds in which it finished the attack
            "keys": int, "parallel": int, "per_key_per_hour": int},  # its pool, keys at once, the
                                       # per-key rate limit that prices its hours
        "utility": {"test_accuracy": {...}, "label_change_rate": {...},   # of the defended answers
                    "benign_flagged": {...},    # 1 when monitoring flagged the benign client
                    "target_train_accuracy": {...}, "target_held_out_accuracy": {...}},  # of the model
        "wall_time_s": {...},
        "curves": {name: {"x": [...], "y": [...]}}  # ROC (fpr, tpr), agreement against queries
        "images": {name: [[...], ...]}  # inversion reconstructions, one flattened image per class
        "samples": [{name: [float, ...]}, ...]  # per seed, per-item values the verdict's interval
                                       # resamples (inversion: each reconstruction's advantage, its victim)
        "dp_audit": null | {           # DP-SGD rows: the one-run canary audit of the target's training
          "epsilon_lower_bound": {...}, "epsilon": {...},  # audited bound, accountant's epsilon, at delta
          "confidence": float, "delta": float, "method": str, "canaries": int}
      }, ...]
    }

Every number comes with its seed count and spread; the verdicts and the summary, each with its 95%
interval, are ``benchmarks.verdicts``'s.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from attacks.scoring import clopper_pearson
from benchmarks.verdicts import REFERENCED_FAMILIES, bounds_text, interval, summary, verdicts
from benchmarks.verdicts import group as _group
from benchmarks import ownership

SCHEMA_VERSION = 1
Row = dict[str, Any]


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation and the per-seed values of one measure."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size == 0:
        return {"mean": None, "std": None, "values": list(values)}
    return {"mean": float(array.mean()), "std": float(array.std()), "values": [float(v) for v in array]}


def membership_advantage_bound(epsilon: float, delta: float) -> float:
    """The largest membership advantage (TPR - FPR) any attack can reach against an
    (epsilon, delta)-DP training algorithm: (e^eps - 1 + 2 delta) / (e^eps + 1)
    (the hypothesis-testing view of DP, Kairouz et al. 2015, Thm. 2.1)."""
    return float((np.expm1(epsilon) + 2 * delta) / (np.exp(epsilon) + 1))


def _summary_table(lines: list[Row]) -> list[list[str]]:
    table = [["dataset", "model", "family", "cheapest defence to chance (closest that lowers it)",
              "what the attacker still gets (95% CI)", "accuracy cost", "labels changed",
              "what legitimate clients lose", "benign client flagged"]]
    for line in lines:
        cheapest = f"none does (closest: {line['closest']})" if line["closest"] else line["cheapest"]
        if line["indicative"] and line["cheapest"] != "no verdict":
            cheapest += " (indicative: one seed)"
        flagged, cost = line["benign_flagged"], line["accuracy_cost"]
        table.append([line["dataset"], line["model"], line["family"], cheapest,
                      f"{line['still']} [{line['attack']}]" if line["still"] != "–" else "–",
                      "–" if cost is None else f"{100 * cost:.1f} pts", "–" if line["label_change_rate"] is None
                      else f"{100 * line['label_change_rate']:.1f}%", line["client_loss"],
                      "–" if flagged is None else f"{flagged:.0%} of seeds"])
    return table


def write(out: Path, config: dict[str, Any], rows: list[Row]) -> dict[str, Path]:
    """Write the three report files into ``out`` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps({"schema": SCHEMA_VERSION, "config": config, "rows": rows}, indent=1))
    findings = verdicts(rows)
    paths["markdown"].write_text(_markdown(config, rows, findings))
    from benchmarks import report_html  # it draws with this module's measures

    paths["html"].write_text(report_html.render(config, rows, findings))
    return paths


def _fmt(measure: dict[str, Any] | None) -> str:
    if not measure or measure.get("mean") is None:
        return "–"
    n = len(measure["values"])
    return f"{measure['mean']:.3f} ± {measure['std']:.3f} (n={n})" if n > 1 else f"{measure['mean']:.3f} (n=1)"


def _first_event(values: list[int | None]) -> str:
    seen = [v for v in values if v is not None]
    return f"{int(np.median(seen))} ({len(seen)}/{len(values)} seeds)" if seen else "never"


def _attacker_cost(cost: dict[str, Any] | None) -> str:
    """"stealing costs >= N keys and T hours": the key-rotating attacker's burned keys, rows and hours."""
    if cost is None:
        return "–"
    seeds = len(cost["keys_burned"]["values"])
    return (f"{cost['keys_burned']['mean']:.0f} of {cost['keys']} keys burned, {cost['queries_spent']['mean']:.0f} "
            f"rows, {cost['hours']['mean']:.2f} h at {cost['per_key_per_hour']}/h per key x {cost['parallel']}; "
            f"finished {cost['finished']}/{seeds} seeds")


def _verdict_table(findings: list[Row]) -> list[list[str]]:
    header = ["dataset", "model", "family", "defence", "strongest attack (undefended's)",
              "metric (chance or no-model reference, 95% CI)", "undefended (95% CI)", "defended (95% CI)", "verdict",
              "accuracy cost", "labels changed"]
    lines = [header]
    for f in findings:
        cost = "–" if f["accuracy_cost"] is None else f"{100 * f['accuracy_cost']:.1f} pts"
        changed = "–" if f["label_change_rate"] is None else f"{100 * f['label_change_rate']:.1f}%"
        defended = "–" if f["defended"] is None else f"{f['defended']:.3f} {bounds_text(f['interval'])}"
        undefended = "–" if f["undefended"] is None else f"{f['undefended']:.3f} {bounds_text(f['undefended_interval'])}"
        lines.append([f["dataset"], f["model"], f["family"], f["defence"],
                      f"{f['strongest_attack']} ({f['baseline_attack'] or '–'})",
                      f"{f['metric']} ({f['chance']:.3g}{_bounds(f['chance_interval'])})", undefended,
                      defended, f["verdict"], cost, changed])
    return lines


def _bounds(bounds: tuple[float, float] | None) -> str:
    return "" if bounds is None else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _rows_table(rows: list[Row]) -> list[list[str]]:
    header = ["dataset", "model", "defence", "attack", "status", "success", "queries", "flagged at",
              "blocked at", "attacker cost", "test accuracy", "labels changed", "wall s"]
    lines = [header]
    for r in rows:
        bounds = _bounds(interval(r)) if r["status"] == "ok" else ""
        if bounds and r["family"] in REFERENCED_FAMILIES:
            bounds = f" (advantage{bounds})"
        success = _fmt(r["metrics"].get(r["primary"])) + bounds if r["status"] == "ok" else r["reason"]
        lines.append([r["dataset"], r["model"], r["defence"], r["attack"] + (" (adaptive)" if r["adaptive"] else ""),
                      r["status"], f"{r['primary']} {success}", _fmt(r["queries"]), _first_event(r["flagged_at"]),
                      _first_event(r["blocked_at"]), _attacker_cost(r["attacker_cost"]),
                      _fmt(r["utility"]["test_accuracy"]),
                      _fmt(r["utility"]["label_change_rate"]), _fmt(r["wall_time_s"])])
    return lines


def _markdown_table(lines: list[list[str]]) -> str:
    escape = [[cell.replace("|", "\\|") for cell in line] for line in lines]
    out = ["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(escape[0])]
    out += ["| " + " | ".join(line) + " |" for line in escape[1:]]
    return "\n".join(out)


DP_AUDIT_NOTE = ("The audited epsilon is the largest lower bound a membership attack's ROC proves (Clopper-Pearson, "
                 "95% confidence per seed and attack, at the row's delta); the canary audit's is the one-run audit of "
                 "Steinke, Nasr & Jagielski (2023) with white-box gradient canaries (95% confidence per seed), beside "
                 "the accountant's epsilon at the audit's smaller delta. Far below epsilon is expected (one attack, one "
                 "run); above it means the training does not deliver the epsilon it reports.")
DP_NOTE = ("The measured advantage is the strongest membership attack's TPR - FPR at its best threshold (mean over "
           "seeds; interval: Clopper-Pearson on the TPR over the members and the FPR over the non-members of the "
           "first seed's best ROC point, 97.5% each). The bound is the most any attack can reach against "
           "(epsilon, delta)-DP training: close to 1 (large epsilon) it rules nothing out, and the measured "
           "advantage and the audited epsilon are what the run shows. " + DP_AUDIT_NOTE)


def advantage_interval(row: Row) -> tuple[float, float] | None:
    """95% interval of a membership attack's advantage (TPR - FPR) at the first seed's best ROC point:
    Clopper-Pearson on its TPR over the members and on its FPR over the non-members, 97.5% each
    (Bonferroni); None when the row has no ROC or no member counts."""
    metrics, roc = row["metrics"], row.get("curves", {}).get("roc")
    if not roc or "members" not in metrics or "non_members" not in metrics:
        return None
    fpr, tpr = np.asarray(roc["x"], dtype=float), np.asarray(roc["y"], dtype=float)
    best = int(np.argmax(tpr - fpr))
    members, non_members = int(metrics["members"]["values"][0]), int(metrics["non_members"]["values"][0])
    tpr_low, tpr_high = clopper_pearson(tpr[best] * members, members, 0.975)
    fpr_low, fpr_high = clopper_pearson(fpr[best] * non_members, non_members, 0.975)
    return tpr_low - fpr_high, tpr_high - fpr_low


def _dp_table(config: dict[str, Any], rows: list[Row]) -> list[list[str]]:
    """For each DP row: the strongest measured membership advantage, with its interval, beside the
    (epsilon, delta) bound, and the largest epsilon lower bound an attack proves
    (``guard.dp.audit.membership_epsilon``) beside epsilon."""
    lines = [["dataset", "model", "defence", "epsilon", "delta", "measured advantage, 95% interval (attack)",
              "bound: most any attack can reach", "audited epsilon >= (attack; 95% each)",
              "canary audit: epsilon >= (95% each) / accountant's, at delta"]]
    specs = config.get("defence_specs", {})
    for (dataset, model, defence), group in _group([r for r in rows if r["family"] == "membership"
                                                    and r["status"] == "ok"], ("dataset", "model", "defence")).items():
        epsilon = specs.get(defence, {}).get("dp_epsilon")
        if epsilon is None:
            continue
        best = max(group, key=lambda r: r["metrics"]["advantage"]["mean"])
        audited = max(group, key=lambda r: r["metrics"].get("epsilon_lower_bound", {}).get("mean", -1.0))
        lower = audited["metrics"].get("epsilon_lower_bound")
        delta = config["dp_delta"][dataset]
        lines.append([dataset, model, defence, f"{epsilon:g}", f"{delta:g}",
                      f"{_fmt(best['metrics']['advantage'])}{_bounds(advantage_interval(best))} ({best['attack']})",
                      f"{membership_advantage_bound(epsilon, delta):.3f}",
                      f"{_fmt(lower)} ({audited['attack']})" if lower else "not measured",
                      _canary_cell(next((r["dp_audit"] for r in group if r.get("dp_audit")), None))])
    return lines


def _canary_cell(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "not run"
    return (f"{_fmt(audit['epsilon_lower_bound'])} / {audit['epsilon']['mean']:.2f}, "
            f"delta {audit['delta']:.2g} ({audit['canaries']} canaries)")


def _threat_models(config: dict[str, Any], rows: list[Row]) -> list[str]:
    """One line per attack family in the rows: its threat model and no-model reference."""
    stated = config.get("threat_models", {})
    return [f"- **{family}**: {stated[family]}" for family in sorted({r["family"] for r in rows}) if family in stated]


def _targets_table(rows: list[Row]) -> list[list[str]]:
    """The undefended targets' accuracy on their training set and on held-out records."""
    lines = [["dataset", "model", "train accuracy", "held-out accuracy"]]
    for (dataset, model), group in _group([r for r in rows if r["defence"] == "none"], ("dataset", "model")).items():
        utility = group[0]["utility"]
        lines.append([dataset, model, _fmt(utility.get("target_train_accuracy")),
                      _fmt(utility.get("target_held_out_accuracy"))])
    return lines


def _inversion_table(rows: list[Row]) -> list[list[str]]:
    """Every inversion and attribute-inference measure beside the no-model reference's."""
    lines = [["dataset", "model", "defence", "attack", "measure", "attack's", "no-model reference", "advantage"]]
    for r in rows:
        if r["family"] not in REFERENCED_FAMILIES or r["status"] != "ok":
            continue
        for name in sorted(n for n in r["metrics"] if f"reference_{n}" in r["metrics"]):
            lines.append([r["dataset"], r["model"], r["defence"], r["attack"], name, _fmt(r["metrics"][name]),
                          _fmt(r["metrics"][f"reference_{name}"]), _fmt(r["metrics"].get(f"advantage_{name}"))])
    return lines


def unverdicted_reasons(rows: list[Row], findings: list[Row]) -> list[str]:
    """Why families have no verdict: one line per attack that could not run, with its reason."""
    judged = {(f["dataset"], f["model"], f["family"]) for f in findings}
    return sorted({f"{r['dataset']} {r['model']} {r['family']} ({r['attack']}): {r['reason']}" for r in rows
                   if r["status"] != "ok" and (r["dataset"], r["model"], r["family"]) not in judged})


def _unverdicted(rows: list[Row], findings: list[Row]) -> str:
    reasons = unverdicted_reasons(rows, findings)
    return "\n".join(["Families without a verdict, and why:", *(f"- {r}" for r in reasons)]) if reasons else ""


PARTIAL_TEXT = "interrupted; only the cells that finished are reported (run again with --resume)."
PARTIAL = f"**Partial run**: {PARTIAL_TEXT}"


def summary_markdown(config: dict[str, Any], rows: list[Row]) -> str:
    """The report's summary section: which defence to turn on, and what it costs."""
    return "\n\n".join(part for part in [
        "## Summary: which defence to turn on, and what it costs", PARTIAL if config.get("partial") else "",
        _markdown_table(_summary_table(summary(verdicts(rows), config)))] if part)


def _markdown(config: dict[str, Any], rows: list[Row], findings: list[Row]) -> str:
    """The same order as ``report.html``: the answer (summary, what to do, DP-SGD), then the details."""
    from benchmarks import advice  # it reads this module's summary

    dp, owned = _dp_table(config, rows), ownership.section(rows)
    return "\n\n".join(part for part in [
        "# predguard benchmark report",
        f"Seeds: {config.get('seeds')}; datasets: {config.get('datasets')}; command: `{config.get('command', '')}`",
        summary_markdown(config, rows),
        "The privacy-utility figure of each attack family is in `report.html`.",
        "## What to do", "\n".join(f"- {line}" for line in advice.sentences(findings, summary(findings, config))),
        *(["## DP-SGD: what was measured beside what the guarantee allows", _markdown_table(dp), DP_NOTE]
          if len(dp) > 1 else []),
        *(["## Ownership: copies proven from the watermark records", _markdown_table(owned), ownership.NOTE]
          if len(owned) > 1 else []),
        "## Threat models and no-model references", "\n".join(_threat_models(config, rows)),
        "## Targets", _markdown_table(_targets_table(rows)),
        "## Verdict", _markdown_table(_verdict_table(findings)), _unverdicted(rows, findings),
        "## Inversion and attribute inference beside the no-model reference", _markdown_table(_inversion_table(rows)),
        "## All rows", _markdown_table(_rows_table(rows)),
        "Figures are in `report.html`; every number is the mean ± standard deviation over the listed seeds.",
    ] if part) + "\n"
