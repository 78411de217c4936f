"""The report's answer: what-to-do sentences written from the verdicts, the DP-SGD rows with the
measured advantage's interval beside the bound, and report.md in the page's order."""
from __future__ import annotations

from report_rows import MEMBERS, config, membership, rows

from attacks.scoring import clopper_pearson
from benchmarks import advice, report, report_html


def test_what_to_do_names_the_defence_its_cost_and_what_cannot_help():
    findings = report.verdicts(rows())
    sentences = advice.sentences(findings, report.summary(findings, config()))
    [membership_advice] = [s for s in sentences if "turn on" in s]
    assert membership_advice.startswith("Against membership inference") and "turn on dp-eps8" in membership_advice
    assert "3.0 accuracy points" in membership_advice and "retrained with DP-SGD" in membership_advice
    assert any(s.startswith("Against model extraction") and "no defence of this run" in s
               and "still gets: the copy still agrees 95.0%" in s for s in sentences)
    assert "label_only, monitoring, round:1 did not reduce membership on any target of this run: they do not " \
           "protect against it." in sentences


def test_what_to_do_says_when_an_attack_fails_undefended():
    failing = [membership("none", 0.011), membership("round:1", 0.01)]
    findings = report.verdicts(failing)
    [sentence] = advice.sentences(findings, report.summary(findings, config()))
    assert "membership inference" in sentence.lower() and "fails" in sentence and "undefended" in sentence
    assert "turn on" not in sentence


def test_dp_rows_show_the_measured_advantage_with_its_interval_beside_the_bound():
    dp = membership("dp-eps8", 0.05, power=0.5)
    [header, line] = report._dp_table(config(), [dp])
    assert header[5].startswith("measured advantage, 95% interval")
    fpr, tpr = dp["curves"]["roc"]["x"], dp["curves"]["roc"]["y"]
    best = max(range(len(fpr)), key=lambda i: tpr[i] - fpr[i])
    low, high = report.advantage_interval(dp)
    assert low < tpr[best] - fpr[best] < high
    assert low == clopper_pearson(tpr[best] * MEMBERS, MEMBERS, 0.975)[0] - \
        clopper_pearson(fpr[best] * MEMBERS, MEMBERS, 0.975)[1]
    assert f"[{low:.3f}, {high:.3f}]" in line[5] and line[6] == "0.999" and line[7].startswith("0.400")


def test_markdown_keeps_the_pages_order_with_the_detail_tables_at_the_end():
    markdown = report._markdown(config(), rows(), report.verdicts(rows()))  # the text of report.md
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == ["## Summary: which defence to turn on, and what it costs", "## What to do",
                        "## DP-SGD: what was measured beside what the guarantee allows",
                        "## Threat models and no-model references", "## Targets", "## Verdict",
                        "## Inversion and attribute inference beside the no-model reference", "## All rows"]


def test_a_run_without_verdicts_says_why_instead_of_an_empty_summary(tmp_path):
    defended_only = [membership("round:1", 0.07)]
    page = report.write(tmp_path, config(), defended_only)["html"].read_text()
    assert report_html.NO_SUMMARY in page and "<section id='advice'>" not in page
