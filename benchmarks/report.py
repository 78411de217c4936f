"""Write a benchmark run as ``results.json``, ``report.md`` and a self-contained ``report.html``.

``results.json`` schema (version 1)::

    {
      "schema": 1,
      "config": {...},                 # the exact run configuration: datasets, models, defences,
                                       # attacks, seeds, query budgets, package versions
      "rows": [{
        "dataset": str, "model": str, "defence": str, "attack": str,
        "family": "extraction" | "membership" | "inversion" | "attribute",
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
        "utility": {"test_accuracy": {...}, "label_change_rate": {...},   # of the defended answers
                    "benign_flagged": {...},    # 1 when monitoring flagged the benign client
                    "target_train_accuracy": {...}, "target_held_out_accuracy": {...}},  # of the model
        "wall_time_s": {...},
        "curves": {name: {"x": [...], "y": [...]}}  # ROC (fpr, tpr), agreement against queries
        "images": {name: [[...], ...]}  # inversion reconstructions, one flattened image per class
        "dp_audit": null | {           # DP-SGD rows: the one-run canary audit of the target's training
          "epsilon_lower_bound": {...}, "epsilon": {...},  # audited bound, accountant's epsilon, at delta
          "confidence": float, "delta": float, "method": str, "canaries": int}
      }, ...]
    }

Every number comes with its seed count and spread; the verdict never credits a defence against an
attack that also fails on the undefended model.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from attacks.scoring import clopper_pearson
from guard.outputs import read_spec

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


def verdicts(rows: list[Row]) -> list[Row]:
    """For each dataset, model and attack family: the strongest attack's success without defence, and
    for each defence whether it brings that family to chance, with its utility cost.

    A family whose strongest undefended attack does not clear chance by more than its spread gets no
    verdict (a defence is never credited for stopping an attack that fails anyway), and a defence
    is credited only where the strongest attack against it is lower than the undefended one by more
    than their spread (``_clearly_lower``) and at chance (``_at_chance``: for a TPR at fixed FPR, the
    upper end of its 95% Clopper-Pearson interval over candidates and seeds within chance's own
    interval). For TPR rows the strongest attack is the one with the highest upper bound."""
    findings = []
    for key, group in _group(rows, ("dataset", "model", "family")).items():
        by_defence = {defence: members for (defence,), members in _group(group, ("defence",)).items()}
        baseline = _strongest(by_defence.get("none", []))
        if baseline is None:
            continue
        if key[2] in REFERENCED_FAMILIES:  # judged on the advantage over the no-model reference
            measured, metric, chance = advantage, f"advantage in {baseline['primary']} over the no-model reference", 0.0
        else:
            measured, metric, chance = _success, baseline["primary"], baseline["chance"]
        for defence, members in by_defence.items():
            row = _strongest(members)
            stopped = [r for r in members if r["status"] == "stopped"]
            if defence == "none" or (row is None and not stopped):
                continue
            reference = row or stopped[0]
            if not _above_chance(baseline):
                outcome = "no verdict: the attack fails undefended"
            elif row is None:
                outcome = "stops every attack (degraded or blocked the attacker)"
            elif not _clearly_lower(row, baseline):
                outcome = "does not help"
            elif _at_chance(row):
                outcome = "brings it to chance" if key[2] not in REFERENCED_FAMILIES else "brings it to the no-model reference"
            else:
                outcome = f"reduces it from {measured(baseline):.3g} to {measured(row):.3g}"
            accuracy = reference["utility"]["test_accuracy"]["mean"]
            base_accuracy = baseline["utility"]["test_accuracy"]["mean"]
            findings.append({
                "dataset": key[0], "model": key[1], "family": key[2], "defence": defence,
                "strongest_attack": reference["attack"], "metric": metric, "chance": chance,
                "undefended": measured(baseline), "defended": measured(row) if row else None, "outcome": outcome,
                "accuracy_cost": base_accuracy - accuracy,
                "label_change_rate": reference["utility"]["label_change_rate"]["mean"],
                "benign_flagged": (reference["utility"].get("benign_flagged") or {}).get("mean"),
                "interval": interval(row) if row else None, "chance_interval": chance_interval(reference),
            })
    return findings


CREDITED = ("brings it to chance", "brings it to the no-model reference",
            "stops every attack (degraded or blocked the attacker)")

STILL_GETS = {
    "extraction": "the copy still agrees {value:.1%} with the target (chance {chance:.1%})",
    "membership": "members are still found at TPR {value:.3f} at 1% FPR{bounds} (chance {chance:.3g})",
    "inversion": "reconstructions still beat the no-model reference by {value:.3f}",
    "attribute": "the attribute is still inferred {value:.1%} more often than without the model",
}


def client_loss(defence: str, config: dict[str, Any]) -> str:
    """What legitimate clients lose under ``defence``, in words."""
    spec = config.get("defence_specs", {}).get(defence, {})
    if spec.get("dp_epsilon") is not None:
        return "nothing in the answers' format; the model is retrained with DP-SGD"
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


def summary(findings: list[Row], config: dict[str, Any]) -> list[Row]:
    """Per dataset, model and attack family: the cheapest defence (least accuracy lost, then fewest
    labels changed) that brings the strongest attack to chance, with its whole cost, or, when none
    does, the defence that got closest and what the attacker still gets against it."""
    lines = []
    for (dataset, model, family), group in _group(findings, ("dataset", "model", "family")).items():
        judged = [f for f in group if not f["outcome"].startswith("no verdict")]
        if not judged:
            continue
        credited = [f for f in judged if f["outcome"] in CREDITED]
        if credited:
            best = min(credited, key=lambda f: (f["accuracy_cost"], f["label_change_rate"] or 0.0))
        else:
            best = min(judged, key=lambda f: (f["defended"] if f["defended"] is not None else np.inf))
        still = ("–" if best["defended"] is None or best in credited else
                 STILL_GETS.get(family, "{value:.3f} (chance {chance:.3g})").format(
                     value=best["defended"], chance=best["chance"], bounds=_bounds(best["interval"])))
        lines.append({"dataset": dataset, "model": model, "family": family,
                      "cheapest": best["defence"] if credited else "none does",
                      "closest": best["defence"], "attack": best["strongest_attack"], "still": still,
                      "accuracy_cost": best["accuracy_cost"], "label_change_rate": best["label_change_rate"],
                      "benign_flagged": best.get("benign_flagged"),
                      "client_loss": client_loss(best["defence"], config)})
    return lines


def _summary_table(lines: list[Row]) -> list[list[str]]:
    table = [["dataset", "model", "family", "cheapest defence to chance", "what the attacker still gets",
              "accuracy cost", "labels changed", "what legitimate clients lose", "benign client flagged"]]
    for line in lines:
        cheapest = line["cheapest"] if line["cheapest"] != "none does" else f"none does (closest: {line['closest']})"
        flagged = line["benign_flagged"]
        table.append([line["dataset"], line["model"], line["family"], cheapest,
                      f"{line['still']} [{line['attack']}]" if line["still"] != "–" else "–",
                      f"{100 * line['accuracy_cost']:.1f} pts", "–" if line["label_change_rate"] is None
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
    paths["html"].write_text(_html(config, rows, findings))
    return paths


def _group(rows: list[Row], keys: tuple[str, ...]) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _success(row: Row) -> float:
    return row["metrics"][row["primary"]]["mean"]


REFERENCED_FAMILIES = ("inversion", "attribute")
"""Families measured beside a no-model reference (``benchmarks.scenarios.THREAT_MODELS``)."""


def advantage(row: Row) -> float:
    """What a row's attack gains over what the attacker has without it: for inversion and attribute
    inference the advantage over the no-model reference (its ``chance``), e.g. a reconstruction's
    line-up accuracy minus that of the attacker's own mean image; for the other families the margin
    over chance. The verdict ranks attacks, and judges defences, on it."""
    if row["family"] in REFERENCED_FAMILIES:
        measure = row["metrics"].get(f"advantage_{row['primary']}")
        if measure and measure["mean"] is not None:
            return measure["mean"]
    return _success(row) - row["chance"]


MINIMAL_MARGIN = 0.02
"""The smallest difference in a success measure the verdict treats as real, however small the spread."""


def _spread(row: Row) -> float:
    return row["metrics"][row["primary"]]["std"] or 0.0


def interval(row: Row) -> tuple[float, float] | None:
    """95% Clopper-Pearson interval of a TPR at fixed FPR, pooled over candidates and seeds (the
    members of every seed are the trials); None for other measures."""
    metrics = row["metrics"]
    if not row["primary"].startswith("tpr_at") or "members" not in metrics:
        return None
    members = metrics["members"]["values"]
    hits = sum(rate * count for rate, count in zip(metrics[row["primary"]]["values"], members))
    return clopper_pearson(hits, int(sum(members)))


def chance_interval(row: Row) -> tuple[float, float] | None:
    """The interval a chance attack (TPR = FPR) would get over as many members; None for other measures."""
    members = row["metrics"].get("members", {}).get("values")
    if not row["primary"].startswith("tpr_at") or not members:
        return None
    return clopper_pearson(row["chance"] * sum(members), int(sum(members)))


def _above_chance(row: Row) -> bool:
    """Success exceeds chance: for a TPR at fixed FPR, the lower end of its interval is above the FPR;
    otherwise the advantage over chance (the no-model reference) exceeds twice the seed spread and a
    minimal absolute margin."""
    bounds = interval(row)
    if bounds is not None:
        return bounds[0] > row["chance"]
    return advantage(row) > max(2 * _spread(row), MINIMAL_MARGIN)


def _at_chance(row: Row) -> bool:
    """No better than chance: for a TPR at fixed FPR, the upper end of its interval is within chance's
    interval (so a defence is credited only when even the optimistic reading of the attack is chance)."""
    bounds, chance = interval(row), chance_interval(row)
    if bounds is not None and chance is not None:
        return bounds[1] <= chance[1]
    return not _above_chance(row)


def _clearly_lower(row: Row, baseline: Row) -> bool:
    """``row``'s success is below ``baseline``'s by more than twice their combined seed spread and
    by the minimal margin."""
    margin = max(2 * float(np.hypot(_spread(row), _spread(baseline))), MINIMAL_MARGIN)
    return _success(row) < _success(baseline) - margin


def _strength(row: Row) -> float:
    """How far an attack beats chance: by the upper end of its interval for a TPR at fixed FPR, else
    by its ``advantage`` (over the no-model reference for inversion and attribute inference)."""
    bounds = interval(row)
    return bounds[1] - row["chance"] if bounds is not None else advantage(row)


def _strongest(rows: list[Row]) -> Row | None:
    """The finished attack that beat its chance level by most (``_strength``), or None if none finished."""
    done = [r for r in rows if r["status"] == "ok"]
    return max(done, key=_strength) if done else None


def _fmt(measure: dict[str, Any] | None) -> str:
    if not measure or measure.get("mean") is None:
        return "–"
    n = len(measure["values"])
    return f"{measure['mean']:.3f} ± {measure['std']:.3f} (n={n})" if n > 1 else f"{measure['mean']:.3f} (n=1)"


def _first_event(values: list[int | None]) -> str:
    seen = [v for v in values if v is not None]
    return f"{int(np.median(seen))} ({len(seen)}/{len(values)} seeds)" if seen else "never"


def _verdict_table(findings: list[Row]) -> list[list[str]]:
    header = ["dataset", "model", "family", "defence", "strongest attack",
              "metric (chance or no-model reference, 95% CI)", "undefended", "defended (95% CI)", "verdict",
              "accuracy cost", "labels changed"]
    lines = [header]
    for f in findings:
        cost = "–" if f["accuracy_cost"] is None else f"{100 * f['accuracy_cost']:.1f} pts"
        changed = "–" if f["label_change_rate"] is None else f"{100 * f['label_change_rate']:.1f}%"
        defended = "–" if f["defended"] is None else f"{f['defended']:.3f}" + _bounds(f["interval"])
        lines.append([f["dataset"], f["model"], f["family"], f["defence"], f["strongest_attack"],
                      f"{f['metric']} ({f['chance']:.3g}{_bounds(f['chance_interval'])})", f"{f['undefended']:.3f}",
                      defended, f["outcome"], cost, changed])
    return lines


def _bounds(bounds: tuple[float, float] | None) -> str:
    return "" if bounds is None else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _rows_table(rows: list[Row]) -> list[list[str]]:
    header = ["dataset", "model", "defence", "attack", "status", "success", "queries", "flagged at",
              "blocked at", "test accuracy", "labels changed", "wall s"]
    lines = [header]
    for r in rows:
        success = (_fmt(r["metrics"].get(r["primary"])) + _bounds(interval(r)) if r["status"] == "ok"
                   else r["reason"])
        lines.append([r["dataset"], r["model"], r["defence"], r["attack"] + (" (adaptive)" if r["adaptive"] else ""),
                      r["status"], f"{r['primary']} {success}", _fmt(r["queries"]), _first_event(r["flagged_at"]),
                      _first_event(r["blocked_at"]), _fmt(r["utility"]["test_accuracy"]),
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


def _dp_table(config: dict[str, Any], rows: list[Row]) -> list[list[str]]:
    """For each DP row: the strongest measured membership advantage beside the (epsilon, delta) bound, and the
    largest epsilon lower bound an attack proves (``guard.dp.audit.membership_epsilon``) beside epsilon."""
    lines = [["dataset", "model", "defence", "epsilon", "delta", "measured advantage (attack)", "bound",
              "audited epsilon >= (attack; 95% each)", "canary audit: epsilon >= (95% each) / accountant's, at delta"]]
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
                      f"{_fmt(best['metrics']['advantage'])} ({best['attack']})",
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


def _unverdicted(rows: list[Row], findings: list[Row]) -> str:
    """Why families have no verdict: attacks that could not run, with their reasons."""
    judged = {(f["dataset"], f["model"], f["family"]) for f in findings}
    reasons = sorted({f"- {r['dataset']} {r['model']} {r['family']} ({r['attack']}): {r['reason']}" for r in rows
                      if r["status"] != "ok" and (r["dataset"], r["model"], r["family"]) not in judged})
    return "\n".join(["Families without a verdict, and why:", *reasons]) if reasons else ""


PARTIAL = "**Partial run**: interrupted; only the cells that finished are reported (run again with `--resume`)."


def summary_markdown(config: dict[str, Any], rows: list[Row]) -> str:
    """The report's summary section: which defence to turn on, and what it costs."""
    return "\n\n".join(part for part in [
        "## Summary: which defence to turn on, and what it costs", PARTIAL if config.get("partial") else "",
        _markdown_table(_summary_table(summary(verdicts(rows), config)))] if part)


def _markdown(config: dict[str, Any], rows: list[Row], findings: list[Row]) -> str:
    return "\n\n".join(part for part in [
        "# predguard benchmark report",
        f"Seeds: {config.get('seeds')}; datasets: {config.get('datasets')}; command: `{config.get('command', '')}`",
        summary_markdown(config, rows),
        "## Threat models and no-model references", "\n".join(_threat_models(config, rows)),
        "## Targets", _markdown_table(_targets_table(rows)),
        "## Verdict", _markdown_table(_verdict_table(findings)), _unverdicted(rows, findings),
        "## Inversion and attribute inference beside the no-model reference", _markdown_table(_inversion_table(rows)),
        "## DP-SGD: measured membership advantage and its theoretical bound", _markdown_table(_dp_table(config, rows)),
        DP_AUDIT_NOTE,
        "## All rows", _markdown_table(_rows_table(rows)),
        "Figures are in `report.html`; every number is the mean ± standard deviation over the listed seeds.",
    ] if part) + "\n"


def _html(config: dict[str, Any], rows: list[Row], findings: list[Row]) -> str:
    def table(lines: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in lines[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in lines[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    figures = "".join(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
                      f"<figcaption>{html.escape(title)}</figcaption></figure>"
                      for title, png in _figures(rows, config.get("image_shapes", {})))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px;margin-bottom:2em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "th{background:#f0f0f0}figure{display:inline-block;margin:1em;vertical-align:top}img{max-width:640px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>predguard benchmark report</title>"
            f"<style>{style}</style></head><body><h1>predguard benchmark report</h1>"
            f"<p>Seeds: {html.escape(str(config.get('seeds')))}; command: <code>{html.escape(str(config.get('command', '')))}</code></p>"
            f"<h2>Summary: which defence to turn on, and what it costs</h2>"
            + (f"<p><strong>Partial run</strong>: {html.escape(PARTIAL.split(': ', 1)[1])}</p>" if config.get("partial") else "")
            + f"{table(_summary_table(summary(findings, config)))}"
            f"<h2>Threat models and no-model references</h2><ul>"
            + "".join(f"<li>{html.escape(line[2:])}</li>" for line in _threat_models(config, rows)) + "</ul>"
            f"<h2>Targets</h2>{table(_targets_table(rows))}"
            f"<h2>Verdict</h2>{table(_verdict_table(findings))}<p>{html.escape(_unverdicted(rows, findings))}</p>"
            f"<h2>Inversion and attribute inference beside the no-model reference</h2>{table(_inversion_table(rows))}"
            f"<h2>DP-SGD: measured membership advantage and its theoretical bound</h2>{table(_dp_table(config, rows))}"
            f"<p>{html.escape(DP_AUDIT_NOTE)}</p>"
            f"<h2>Figures</h2>{figures}"
            f"<h2>All rows</h2>{table(_rows_table(rows))}</body></html>")


def _figures(rows: list[Row], image_shapes: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each figure the rows support."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for (dataset, model), group in _group(rows, ("dataset", "model")).items():
        for family, curve, title, log in (("membership", "roc", "membership ROC", True),
                                          ("extraction", "agreement_vs_queries", "extraction agreement against queries", False)):
            plotted = [_strongest(members) for members in _group(
                [r for r in group if r["family"] == family and curve in r.get("curves", {})], ("defence",)).values()]
            plotted = [r for r in plotted if r is not None]
            if plotted:
                figures.append((f"{dataset} {model}: {title} (strongest attack per defence)",
                                _encode(_curve_figure(plt, plotted, curve, log))))
        inverted = [r for r in group if r["family"] == "inversion" and r.get("images")]
        if inverted:
            figures.append((f"{dataset} {model}: inversion images", _encode(_image_grid(plt, inverted,
                                                                                         image_shapes.get(dataset)))))
        for family, members in _group([r for r in group if r["status"] == "ok"], ("family",)).items():
            figures.append((f"{dataset} {model}: privacy-utility trade-off, {family[0]}",
                            _encode(_tradeoff(plt, members))))
    return figures


FIGURE_SIZE = (5.0, 3.6)
DPI = 100
LAYOUT_PAD = 0.3
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")
LINESTYLES = ("-", "--", "-.", ":")


def _curve_figure(plt, rows: list[Row], curve: str, log: bool):
    """One line per defence, each with its own marker and dash so that lines lying on one another
    stay visible; the undefended line is drawn last, on top."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    ordered = sorted(rows, key=lambda row: row["defence"] == "none")
    for i, row in enumerate(ordered):
        points = row["curves"][curve]
        undefended = row["defence"] == "none"
        axes.plot(points["x"], points["y"], label=f"{row['defence']} ({row['attack']})",
                  linewidth=2.0 if undefended else 1.1, color="k" if undefended else None,
                  linestyle="-" if undefended else LINESTYLES[i % len(LINESTYLES)],
                  marker=MARKERS[i % len(MARKERS)], markersize=3 if log else 5, markevery=0.1 if log else 1,
                  fillstyle="none", zorder=3 if undefended else 2)
    if log:
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8, label="chance")
        axes.set_xlim(1e-3, 1)
        axes.set_ylim(1e-3, 1)
        axes.set_xlabel("false-positive rate")
        axes.set_ylabel("true-positive rate")
    else:
        axes.set_xscale("log")
        axes.set_xlabel("queries (log scale)")
        axes.set_ylabel("agreement with the target")
    axes.legend(fontsize=6, loc="lower right")
    return figure


def _image_grid(plt, rows: list[Row], image_shape: list[int] | None = None):
    """One line per image set, drawn as one mosaic per line (white gaps between images) on a figure
    sized to the images; a reference set (class means, true inputs) shared by several rows is drawn
    once, above the reconstructions."""
    named, seen = [], set()
    for r in rows:
        for name, images in sorted(r["images"].items(), key=lambda item: item[0] == "reconstructions"):
            array = np.asarray(images, dtype=float)
            if name != "reconstructions" and array.tobytes() in seen:
                continue
            seen.add(array.tobytes())
            title = f"{r['attack']} / {r['defence']}" if name == "reconstructions" else f"{name} ({r['attack']})"
            named.append((title, array))
    side = int(round(np.sqrt(named[0][1].shape[1])))
    shape = tuple(image_shape) if image_shape else (side, side)
    columns = max(len(images) for _, images in named)
    gap = max(1, shape[1] // 8)
    width = columns * (shape[1] + gap) - gap
    inches = min(0.55, 7.0 / columns)  # per image, at most 7 inches wide in all
    figure, axes = plt.subplots(len(named), 1, squeeze=False,
                                figsize=(columns * inches, len(named) * (inches * shape[0] / shape[1] + 0.16)))
    for (title, images), axis in zip(named, axes[:, 0]):
        mosaic = np.ones((shape[0], width) + shape[2:])
        for column, image in enumerate(images):
            left = column * (shape[1] + gap)
            mosaic[:, left:left + shape[1]] = np.clip(image.reshape(shape), 0, 1)
        axis.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.axis("off")
        axis.set_title(title, fontsize=6, loc="left", pad=2)
    return figure


def _tradeoff(plt, rows: list[Row]):
    """One family: the defended answers' test accuracy against the strongest attack's success, per defence."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    strongest = [_strongest(members) for members in _group(rows, ("defence",)).values()]
    strongest = [row for row in strongest if row is not None]
    xs = [r["utility"]["test_accuracy"]["mean"] for r in strongest]
    ys = [_success(r) for r in strongest]
    axes.scatter(xs, ys, s=14, zorder=3)
    if strongest:
        axes.axhline(strongest[0]["chance"], color="k", linestyle=":", linewidth=0.8, label="chance")
        axes.set_ylabel(f"strongest attack's {strongest[0]['primary']}")
        axes.legend(fontsize=7)
    axes.set_xlabel("test accuracy of the defended answers (DP-SGD rows in bold: dp-epsN)")
    axes.margins(0.15)
    figure.tight_layout(pad=LAYOUT_PAD)  # the axes where they will be drawn, before measuring labels
    _place_labels(figure, axes, [row["defence"] for row in strongest], xs, ys)
    return figure


LABEL_OFFSETS = tuple((dx * r, dy * r) for r in (6, 14, 24) for dx, dy in
                      ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)))


def _place_labels(figure, axes, labels: list[str], xs: list[float], ys: list[float]) -> None:
    """Annotate each point with its label at the first offset (nearest first) where the label
    overlaps no label placed before and no point, else where it overlaps fewest; a leader line
    joins a label set far from its point."""
    renderer = figure.canvas.get_renderer()
    axes.autoscale_view()
    points = axes.transData.transform(np.column_stack([xs, ys])) if labels else np.empty((0, 2))
    placed = []

    def annotate(label: str, x: float, y: float, offset: tuple[int, int], **options):
        return axes.annotate(label, (x, y), xytext=offset, textcoords="offset points", fontsize=6,
                             ha="left" if offset[0] >= 0 else "right", va="bottom" if offset[1] >= 0 else "top",
                             fontweight="bold" if label.startswith("dp-") else "normal", **options)

    for label, x, y in zip(labels, xs, ys):
        best: tuple[int, tuple[int, int]] | None = None
        for offset in LABEL_OFFSETS:
            trial = annotate(label, x, y, offset)
            box = trial.get_window_extent(renderer).padded(1)
            trial.remove()
            clashes = sum(box.overlaps(other) for other in placed) + int(box.count_contains(points) > 0)
            if best is None or clashes < best[0]:
                best = (clashes, offset)
            if clashes == 0:
                break
        offset = best[1]
        far = max(abs(offset[0]), abs(offset[1])) > LABEL_OFFSETS[0][0]
        text = annotate(label, x, y, offset,
                        arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "0.5"} if far else None)
        placed.append(text.get_window_extent(renderer).padded(1))


def _encode(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.set_layout_engine("tight", pad=LAYOUT_PAD)
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
