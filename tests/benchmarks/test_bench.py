"""``guard bench`` and ``guard audit``: the report's schema, its honesty rules, and that the
undefended attacks succeed through the real middleware where the attack-suite issues say they must."""
from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from benchmarks import models, report
from benchmarks.audit import AuditError, audit, check_host
from benchmarks.endpoint import BENIGN_KEY, http_target, policy
from benchmarks.scenarios import DEFENCES
from benchmarks.verdicts import verdicts
from guard.serving import prediction_app
from guard import GuardMiddleware
from harness_cli import app

# The quick bench behind ``quick_report`` takes minutes on a loaded 2-core machine (its setup counts
# against the first test that asks for it).
pytestmark = pytest.mark.timeout(900)

ROW_KEYS = {"dataset", "model", "defence", "attack", "family", "adaptive", "status", "reason", "primary", "chance",
            "seeds", "metrics", "queries", "flagged_at", "blocked_at", "utility", "wall_time_s", "curves", "images",
            "samples", "attacker_cost", "dp_audit"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """``guard bench --quick`` on a narrowed grid (three defences, one attack of each kind) to keep
    the suite fast; the full quick grid is the README's command."""
    out = tmp_path_factory.mktemp("bench")
    attacks = "equation-solving,copycat,threshold,lira-online,label-only,inverse-model,mi-face"
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out), "--defences",
                                      "none,round:1,label_only", "--attacks", attacks])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())


def test_quick_bench_writes_the_three_reports_with_the_documented_schema(quick_report):
    out, results = quick_report
    assert results["schema"] == report.SCHEMA_VERSION
    assert results["config"]["quick"] and results["config"]["seeds"] == [0]
    for row in results["rows"]:
        assert set(row) == ROW_KEYS
        assert row["status"] in {"ok", "stopped", "not-applicable"}
        if row["status"] == "ok":
            assert row["primary"] in row["metrics"] and len(row["metrics"][row["primary"]]["values"]) == 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # ROC, agreement, image grid, trade-off
    assert "## Verdict" in (out / "report.md").read_text()


def _row(results, model, defence, attack):
    [row] = [r for r in results["rows"] if (r["model"], r["defence"], r["attack"]) == (model, defence, attack)]
    return row


def _success(row):
    return row["metrics"][row["primary"]]["mean"]


def test_undefended_attacks_succeed_through_the_middleware(quick_report):
    _, results = quick_report
    assert _success(_row(results, "softmax", "none", "equation-solving")) == 1.0  # exact, issue 5
    assert _success(_row(results, "mlp", "none", "copycat")) > 0.9
    assert _success(_row(results, "mlp", "none", "inverse-model")) > 0.5  # chance 0.1, issue 7
    assert _success(_row(results, "mlp", "none", "mi-face")) > 0.5
    lira = _row(results, "mlp", "none", "lira-online")["metrics"]
    assert lira["auc"]["mean"] > 0.53 and lira["tpr_at_1pct_fpr"]["mean"] > 0.01  # issue 6, above chance


def test_defences_change_what_the_attacks_get(quick_report):
    _, results = quick_report
    assert _success(_row(results, "softmax", "round:1", "equation-solving")) < 0.95
    blocked = _row(results, "softmax", "label_only", "equation-solving")
    assert blocked["status"] == "not-applicable" and "probabilities" in blocked["reason"]
    assert not [r for r in results["rows"] if r["defence"] == "label_only" and r["attack"] == "lira-online"]
    assert _success(_row(results, "mlp", "label_only", "copycat")) > 0.9  # labels suffice to copy
    for row in results["rows"]:
        if row["defence"] in ("round:1", "label_only"):
            assert row["utility"]["label_change_rate"]["mean"] == 0.0  # output defences keep the top label


def test_every_verdict_carries_its_intervals_and_reduces_only_where_they_separate(quick_report):
    out, results = quick_report
    findings = verdicts(results["rows"])
    assert {f["family"] for f in findings} >= {"extraction", "membership", "inversion"}
    for finding in findings:
        if finding["outcome"] != "no verdict":
            stops = finding["outcome"] == "stops every attack"
            assert finding["interval"] is not None or stops
            assert finding["verdict"].count(" [") >= 2 - stops and finding["verdict"] in (out / "report.md").read_text()
        if finding["outcome"] == "reduces":
            assert finding["interval"][1] < finding["undefended_interval"][0]
        assert finding["indicative"] and finding["verdict"].count("(indicative: one seed)") == 1


def test_dp_advantage_bound():
    assert report.membership_advantage_bound(0.0, 0.0) == 0.0
    assert 0.46 < report.membership_advantage_bound(1.0, 1e-5) < 0.47
    assert report.membership_advantage_bound(8.0, 1e-5) < 1.0


def test_audit_attacks_an_endpoint_and_reports(tmp_path, digits, digits_split, digits_mlp):
    endpoint = prediction_app(lambda X: models.predict_proba(digits_mlp, X), digits.n_features)
    paths = audit("http://endpoint/predict", "digits", tmp_path, client=endpoint, attacks=("copycat",), budget=1000)
    [row] = json.loads(paths["json"].read_text())["rows"]
    assert row["status"] == "ok" and row["metrics"]["agreement_test"]["mean"] > 0.9
    assert row["queries"]["mean"] <= 1000


def test_audit_refuses_hosts_that_are_not_loopback_or_named():
    with pytest.raises(AuditError, match="not a loopback"):
        check_host("http://192.0.2.1/predict", ())
    check_host("http://192.0.2.1/predict", ("192.0.2.1",))
    check_host("http://127.0.0.1:9/predict", ())


def test_audit_of_an_unreachable_endpoint_is_a_clear_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(app, ["audit", "--url", f"http://127.0.0.1:{port}/predict", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cannot reach" in result.output


def test_live_mode_serves_with_uvicorn_and_answers_like_the_asgi_transport(digits, digits_split, digits_mlp):
    endpoint = prediction_app(lambda X: models.predict_proba(digits_mlp, X), digits.n_features)
    endpoint.add_middleware(GuardMiddleware, policy=policy(DEFENCES["round:1"]))
    X = digits.X[digits_split.test[:50]]
    answers = {}
    for live in (False, True):
        with http_target(endpoint, digits.n_classes, digits.n_features, live, [BENIGN_KEY]) as target:
            answers[live] = target.predict_proba(X)
            assert target.url.startswith("http://127.0.0.1:") == live
    assert (answers[True] == answers[False]).all() and (answers[True] == answers[True].round(1)).all()


def test_a_dp_row_summarises_its_canary_audits_over_seeds():
    from benchmarks.cells import row
    from benchmarks.scenarios import ATTACK_SPECS

    def outcome(seed, audited):
        return {"status": "ok", "reason": "", "metrics": {"advantage": 0.1}, "queries": 10, "flagged_at": None,
                "blocked_at": None, "wall_time_s": 1.0, "curves": {}, "images": {}, "utility": {}, "seed": seed,
                "chance": 0.0, "adaptive": False, "attacker_cost": None,
                "dp_audit": {"epsilon_lower_bound": audited, "epsilon": 10.0, "delta": 2.5e-8, "confidence": 0.95,
                             "method": "one-run audit", "canaries": 1000}}

    summary = row(("d", "mlp", "dp-eps8", "lira-online"), ATTACK_SPECS["lira-online"],
                  [outcome(0, 0.5), outcome(1, 1.5)])["dp_audit"]
    assert summary["epsilon_lower_bound"]["mean"] == 1.0 and summary["epsilon_lower_bound"]["values"] == [0.5, 1.5]
    assert summary["confidence"] == 0.95 and summary["canaries"] == 1000
    undefended = outcome(0, 0.0)
    undefended["dp_audit"] = None
    assert row(("d", "mlp", "none", "lira-online"), ATTACK_SPECS["lira-online"], [undefended])["dp_audit"] is None


def test_dp_rows_show_the_audited_epsilon_of_the_strongest_attack():
    def measure(value):
        return {"mean": value, "std": 0.0, "values": [value]}

    rows = [{"dataset": "d", "model": "m", "family": "membership", "defence": "dp-eps1", "attack": attack,
             "status": "ok", "metrics": {"advantage": measure(0.1), "epsilon_lower_bound": measure(bound)}}
            for attack, bound in (("lira", 0.4), ("threshold", 0.2))]
    config = {"defence_specs": {"dp-eps1": {"dp_epsilon": 1.0}}, "dp_delta": {"d": 1e-5}}
    [header, line] = report._dp_table(config, rows)
    assert header[-2].startswith("audited epsilon >=") and line[-2] == "0.400 (n=1) (lira)"
    assert line[-1] == "not run"
    rows[1]["dp_audit"] = {"epsilon_lower_bound": measure(0.7), "epsilon": measure(1.9), "delta": 2.5e-8,
                           "confidence": 0.95, "method": "one-run audit", "canaries": 1000}
    [_, line] = report._dp_table(config, rows)
    assert line[-1] == "0.700 (n=1) / 1.90, delta 2.5e-08 (1000 canaries)"
