"""``report.html``: one self-contained page that answers first and details on demand.

First screen: the summary table, then one privacy-utility figure per attack family, then the "what
to do" sentences and the DP-SGD section. Below, collapsed (``<details>``) and grouped by dataset,
model and family: the verdicts, every attack's row, the no-model reference measures, the ROC and
agreement curves and the inversion grids. Images are embedded as data URIs; the page loads nothing."""
from __future__ import annotations

import html
from typing import Any

from benchmarks import advice, figures, ownership, report, verdicts

Row = dict[str, Any]
STYLE = """
body{font-family:system-ui,sans-serif;margin:1em 1.5em;max-width:1400px;color:#222;font-size:14px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:14px 0 6px}h3{font-size:15px;margin:10px 0 4px}
p.meta{color:#555;margin:0 0 6px;font-size:12px}
table{border-collapse:collapse;font-size:12px;margin:4px 0 10px}
td,th{border:1px solid #ccc;padding:2px 5px;text-align:left;vertical-align:top}th{background:#f0f0f0}
.figures{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}.figures img{max-width:100%;height:auto}
figcaption{font-size:12px;color:#555}
details{margin:4px 0 4px 0.5em}details>summary{cursor:pointer;font-weight:600}
details details{margin-left:1.2em}details details>summary{font-weight:500}
.note{color:#444;font-size:12px}.warn{background:#fff3cd;padding:4px 8px}
"""

NO_SUMMARY = ("No attack family has a verdict: a verdict compares each defence with the undefended model "
              "(guard audit needs --baseline for that), and only where the attack succeeds undefended.")


def _table(lines: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in lines[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in line) + "</tr>" for line in lines[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(title: str, png: str) -> str:
    return (f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def _details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>{body}</details>"


def _tradeoffs(rows: list[Row], specs: dict[str, Any]) -> str:
    families = verdicts.group([r for r in rows if r["status"] == "ok"], ("family",))
    return ("<p class='note'>Each point is the strongest attack against one defence (bars: its 95% interval, or "
            "the seeds' spread), over the accuracy of the answers clients get: down is safer, right is cheaper. "
            "The dotted line is what the attacker gets without the model.</p><div class='figures'>" + "".join(
                f"<img class='tradeoff' alt='{html.escape(family)}: privacy against utility' "
                f"src='data:image/png;base64,{figures.encode(figures.tradeoff(members, specs))}'>"
                for (family,), members in families.items()) + "</div>")


def _target_figures(rows: list[Row], family: str, specs: dict[str, Any], image_shape: list[int] | None) -> str:
    """The ROC or agreement curves (strongest attack per defence) and the inversion grids of one
    target's family."""
    parts = []
    for curve, title in (("roc", "ROC of the strongest attack per defence (bands: 95% interval), first seed"),
                         ("agreement_vs_queries", ("copy's agreement against queries, strongest attack per "
                                                  "defence, first seed"))):
        plotted = [verdicts.strongest(group) for group in verdicts.group(
            [r for r in rows if curve in r.get("curves", {})], ("defence",)).values()]
        plotted = [r for r in plotted if r is not None]
        if plotted:
            parts.append(_figure(title, figures.encode(figures.curves(plotted, curve, specs))))
    if family == "inversion":
        for (attack,), group in verdicts.group([r for r in rows if r.get("images")], ("attack",)).items():
            parts.append(_figure(f"{attack}: victims, the no-model reference and the reconstruction under each "
                                 "defence (first seed)",
                                 figures.encode(figures.inversion_grid(group, image_shape), tight=False)))
    return "<div class='figures'>" + "".join(parts) + "</div>" if parts else ""


def _details_by_target(config: dict[str, Any], rows: list[Row], findings: list[Row]) -> str:
    specs, shapes = config.get("defence_specs", {}), config.get("image_shapes", {})
    sections = []
    for (dataset, model), group in verdicts.group(rows, ("dataset", "model")).items():
        inner = []
        for (family,), members in verdicts.group(group, ("family",)).items():
            judged = [f for f in findings if (f["dataset"], f["model"], f["family"]) == (dataset, model, family)]
            body = ("<h3>Verdict per defence</h3>" + _table(report._verdict_table(judged)) if judged else
                    "<p class='note'>No verdict: see the families without one below.</p>")
            body += "<h3>Every attack</h3>" + _table(report._rows_table(members))
            referenced = report._inversion_table(members)
            if len(referenced) > 1:
                body += "<h3>Beside the no-model reference</h3>" + _table(referenced)
            body += _target_figures(members, family, specs, shapes.get(dataset))
            inner.append(_details(f"{family} ({len(members)} attack rows)", body))
        sections.append(_details(f"{dataset} · {model}", "".join(inner)))
    return "".join(sections)


def render(config: dict[str, Any], rows: list[Row], findings: list[Row]) -> str:
    """The whole page."""
    specs = config.get("defence_specs", {})
    lines = report.summary(findings, config)
    threat_models = config.get("threat_models", {})
    families = sorted({r["family"] for r in rows})
    unverdicted = report.unverdicted_reasons(rows, findings)
    dp, owned = report._dp_table(config, rows), ownership.section(rows)
    sentences = advice.sentences(findings, lines)
    meta = (f"Seeds {html.escape(str(config.get('seeds')))}; datasets {html.escape(str(config.get('datasets')))}; "
            "command "
            f"<code>{html.escape(str(config.get('command', '')))}</code>. "
            "Every number is the mean over the seeds; details below the answer.")
    return "".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>predguard report</title><style>{STYLE}</style></head><body>",
        "<h1>predguard report: which defence to turn on, and what it costs</h1>",
        f"<p class='meta'>{meta}</p>",
        f"<p class='warn'>Partial run: {html.escape(report.PARTIAL_TEXT)}</p>" if config.get("partial") else "",
        "<section id='summary'><h2>Summary</h2>", _table(report._summary_table(lines)) if lines else
        f"<p>{html.escape(NO_SUMMARY)}</p>", "</section>",
        "<section id='tradeoffs'><h2>Privacy and utility, per attack family</h2>", _tradeoffs(rows, specs),
        "</section>",
        "<section id='advice'><h2>What to do</h2>" + _list(sentences) + "</section>" if sentences else "",
        ("<section id='dp'><h2>DP-SGD: what was measured beside what the guarantee allows</h2>" + _table(dp)
         + f"<p class='note'>{html.escape(report.DP_NOTE)}</p></section>") if len(dp) > 1 else "",
        ("<section id='ownership'><h2>Ownership: copies proven from the watermark records</h2>" + _table(owned)
         + f"<p class='note'>{html.escape(ownership.NOTE)}</p></section>") if len(owned) > 1 else "",
        "<section id='details'><h2>Details</h2>",
        _details("Threat models and no-model references", "<dl>" + "".join(
            f"<dt><strong>{html.escape(family)}</strong></dt><dd>{html.escape(threat_models[family])}</dd>"
            for family in families if family in threat_models) + "</dl>") if set(families) & set(threat_models)
        else "",
        _details("Targets (undefended models)", _table(report._targets_table(rows))),
        _details_by_target(config, rows, findings),
        _details("Families without a verdict, and why", _list(unverdicted)) if unverdicted else "",
        "</section></body></html>",
    ])
