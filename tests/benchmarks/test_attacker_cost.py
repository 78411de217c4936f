"""The key-rotating Sybil attacker against the bench's calibrated monitoring: it finishes the Jacobian
extraction attack that stops the one-key attacker, and the monitoring rows report what it cost."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import report
from benchmarks.cells import ONE_KEY, ROTATING, CellTask, row, run_cell
from benchmarks.grid import BenchConfig, Cell
from benchmarks.scenarios import ATTACK_SPECS

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def jacobian_rows(tmp_path_factory):
    """The quick bench's Jacobian attack on the monitored digits softmax target, seed 0."""
    config = BenchConfig(datasets=("digits",), defences=("monitoring",), attacks=("jacobian",), seeds=(0,),
                         quick=True)
    outcomes = run_cell(CellTask(config, tmp_path_factory.mktemp("cache"), Cell("digits", "softmax", 0, "monitoring")))
    return {key[3]: row(key, ATTACK_SPECS["jacobian"], [outcome]) for key, outcome in outcomes}


def test_rotating_attacker_finishes_the_jacobian_attack_against_calibrated_detectors(jacobian_rows):
    one_key, rotating = jacobian_rows["jacobian"], jacobian_rows[f"jacobian ({ROTATING})"]
    assert one_key["flagged_at"][0] is not None, "the calibrated detectors must catch the one-key attacker"
    assert one_key["attacker_cost"] is None
    assert rotating["status"] == "ok", rotating["reason"]
    cost = rotating["attacker_cost"]
    assert cost["finished"] == 1 and cost["keys"] == 200 and cost["parallel"] == 20
    spent, lost = cost["queries_spent"]["mean"], cost["queries_lost"]["mean"]
    # every row the attack needed was answered in full; lost rows were resent, so spent covers both
    assert spent == rotating["queries"]["mean"] + lost
    # the detectors do catch keys (as they catch the one-key attacker): the attacker drops and replaces them
    assert 1 <= cost["keys_burned"]["mean"] <= cost["keys_used"]["mean"] <= 200
    assert cost["hours"]["mean"] == pytest.approx(spent / (1000 * 20))
    assert rotating["metrics"]["agreement_test"]["mean"] > rotating["chance"] + 0.3


def test_the_rows_table_prices_the_rotating_attacker(jacobian_rows):
    lines = report._rows_table(list(jacobian_rows.values()))
    column = lines[0].index("attacker cost")
    cells = {line[3]: line[column] for line in lines[1:]}
    assert cells["jacobian"] == "–"
    assert "keys burned" in cells[f"jacobian ({ROTATING}) (adaptive)"]
    assert ONE_KEY not in cells
    assert np.isfinite(jacobian_rows[f"jacobian ({ROTATING})"]["attacker_cost"]["hours"]["mean"])
