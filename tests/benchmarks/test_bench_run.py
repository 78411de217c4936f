"""``guard bench``'s driver: cache keys from the whole configuration (issue 31), work done once,
the grids, results on a two-node Ray cluster equal to a local run's, and clean interrupts."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from benchmarks import executors, grid, run
from benchmarks.cache import code_digest, digest
from benchmarks.cells import cell_key
from benchmarks.grid import BenchConfig, Cell
from benchmarks.scenarios import ATTACK_SPECS

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
TINY = {"datasets": ("breast_cancer",), "seeds": (0,), "defences": ("none", "round:1"),
        "attacks": ("threshold", "lira-online")}
"""One target, two defences, two membership attacks sharing LiRA's reference models."""


class Counting:
    """A one-process executor that records the cells it ran."""

    def __init__(self) -> None:
        self.ran: list[Cell] = []

    def run(self, function, tasks, done) -> None:
        self.ran += [task.cell for task in tasks]
        executors.LocalPool(1).run(function, tasks, done)


def _tiny(**changes) -> BenchConfig:
    return grid.configure("quick", **{**TINY, **changes})


def _measured(rows: list[dict]) -> list[dict]:
    """Rows without their wall times (the only thing that may differ between two runs)."""
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


def _rows(finished: run.Finished) -> list[dict]:
    return json.loads(finished.paths["json"].read_text())["rows"]


VARIANTS = {"quick": True, "live": True, "epochs": 7, "model": "mypackage.nets:wide", "hidden": 8,
            "activation": "tanh", "lr": 0.5, "min_train_accuracy": 0.5, "max_body_bytes": 4096,
            "training": {"epochs": 1}}


def test_the_cache_key_changes_with_every_field_that_changes_a_cell():
    # every field but the grid's selectors is in the key; "sensitive" through the data's content hash
    assert set(VARIANTS) == {f.name for f in fields(BenchConfig)} - set(grid.SELECTORS) - {"sensitive"}
    config, cell = grid.configure("full"), Cell("digits", "mlp", 0, "none")
    keys = {cell_key(replace(config, **{name: value}), cell) for name, value in VARIANTS.items()}
    assert len(keys | {cell_key(config, cell)}) == len(VARIANTS) + 1
    for name in grid.SELECTORS:  # choosing other cells does not change this one's key
        assert cell_key(replace(config, **{name: ()}), cell) == cell_key(config, cell)


def test_two_user_model_factories_never_share_cached_cells():
    # issue 31: the hand-written key left out config.model
    cell = Cell("digits", "user", 0, "none")
    assert (cell_key(grid.configure(model="one:net"), cell) != cell_key(grid.configure(model="two:net"), cell))


def test_the_default_grid_keeps_the_full_runs_strength():
    default, full = grid.configure(), grid.configure("full")
    assert not default.quick and set(default.attacks) < set(full.attacks)
    assert default.defences == full.defences and default.datasets == full.datasets
    assert replace(default, attacks=full.attacks, seeds=full.seeds, against=None) == full  # budgets, references
    for defence, attacks in grid.STRONGEST.items():  # every defence keeps an attack of every family
        families = {ATTACK_SPECS[a].family for a in attacks}
        assert {"extraction", "membership", "attribute"} <= families and set(attacks) <= set(default.attacks)
    extraction = {a for a, spec in ATTACK_SPECS.items() if spec.family == "extraction" and spec.adapts is None}
    for defence, attacks in grid.OWNERSHIP.items():  # the watermarks: every extraction copy is verified
        assert set(attacks) == extraction and default.against[defence] == attacks
    assert set(default.against) == set(grid.STRONGEST) | set(grid.OWNERSHIP)
    assert grid.attacks_on(grid.configure(attacks=("copycat",)), "none") == ("copycat",)
    assert grid.configure("quick", seeds=(4,)).seeds == (4,)  # the user's options over the grid's


def test_finished_cells_and_shared_models_are_never_recomputed(tmp_path):
    cache, executor = tmp_path / "cache", Counting()
    first = run.run(_tiny(defences=("none",)), tmp_path / "a", executor, cache, progress=False)
    models = sorted((cache / "models").rglob("*.pt"))
    assert executor.ran == [Cell("breast_cancer", "mlp", 0, "none")] and models
    # one new defence: one new cell, and no new model (target and LiRA references are shared)
    executor.ran.clear()
    second = run.run(_tiny(), tmp_path / "b", executor, cache, progress=False)
    assert executor.ran == [Cell("breast_cancer", "mlp", 0, "round:1")]
    assert sorted((cache / "models").rglob("*.pt")) == models
    executor.ran.clear()
    again = run.run(_tiny(), tmp_path / "c", executor, cache, progress=False)
    assert executor.ran == [] and _rows(again) == _rows(second)
    assert _rows(second)[:len(_rows(first))] == _rows(first) and not again.partial
    assert again.summary.startswith("## Summary") and "## Verdict" not in again.summary


def test_a_cell_run_with_other_attacks_is_not_taken_for_finished(tmp_path):
    cache, executor = tmp_path / "cache", Counting()
    run.run(_tiny(defences=("none",), attacks=("threshold",)), tmp_path / "a", executor, cache, progress=False)
    both = run.run(_tiny(defences=("none",)), tmp_path / "b", executor, cache, progress=False)
    assert executor.ran == [Cell("breast_cancer", "mlp", 0, "none")] * 2
    assert {row["attack"] for row in _rows(both)} == {"threshold", "lira-online"}


@pytest.fixture
def ray_cluster(tmp_path_factory):
    """A two-node local Ray cluster (``ray start --head`` and a second ``ray start --address``, one
    CPU each), every process of it ended afterwards."""
    pytest.importorskip("ray")
    from benchmarks.perf.ray_grid import local_cluster

    with local_cluster(2, 1, tmp_path_factory.mktemp("ray")) as address:
        yield address


def _on_node(function, task):
    """``function(task)`` and the Ray node that ran it."""
    import ray

    return ray.get_runtime_context().get_node_id(), function(task)


def test_a_two_node_ray_cluster_gives_the_local_runs_results(tmp_path, ray_cluster):
    import ray

    local = run.run(_tiny(), tmp_path / "local", executors.LocalPool(1), tmp_path / "local-cache", progress=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    nodes = set()

    class Located(executors.RayCluster):
        def run(self, function, tasks, done):
            def record(task, located):
                nodes.add(located[0])
                done(task, located[1])
            super().run(functools.partial(_on_node, function), tasks, record)

    # two cells of one CPU each on two nodes of one CPU each: one cell per node
    on_ray = run.run(_tiny(), tmp_path / "ray", Located(ray_cluster), tmp_path / "ray-cache", progress=False)
    assert len(nodes) == 2
    assert _measured(_rows(on_ray)) == _measured(_rows(local)) and _rows(local)


def _bench(out: Path, cache: Path, *options: str) -> subprocess.Popen:
    """``guard bench`` as a terminal starts it, Ctrl-C included: a test run started in the background
    (``cmd &`` in a script) ignores SIGINT, and an ignored signal stays ignored in its children, while a
    handled one is reset to its default (Python's KeyboardInterrupt) in them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "guard.cli", "bench", "--out", str(out), "--cache", str(cache),
                                 *options], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_ends_every_worker_and_reports_the_finished_cells(tmp_path, signum):
    import psutil

    out, cache = tmp_path / "out", tmp_path / "cache"
    # the faces targets train for half a minute after the first cells finish: the run cannot end before
    # the signal, however fast the machine (digits and breast cancer cells finish within seconds of it)
    grid_options = ["--quick", "--workers", "2", "--data", "digits,breast_cancer,faces", "--defences",
                    "none,round:1,label_only", "--attacks", "threshold,knockoff-adaptive"]
    bench = _bench(out, cache, *grid_options)
    parent = psutil.Process(bench.pid)
    deadline = time.monotonic() + 600
    while not list((cache / "outcomes").rglob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.5)  # until a first attack (and so the pool's workers) finished
    while len(list((cache / "outcomes").rglob("*.json"))) < 3 and bench.poll() is None:
        time.sleep(0.2)  # per-attack outcomes, then the first whole cell
    children = parent.children(recursive=True)
    workers = [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2 and bench.poll() is None
    # Ctrl-C reaches the terminal's whole process group; SIGTERM (kill) only the parent
    os.killpg(bench.pid, signum) if signum == signal.SIGINT else bench.send_signal(signum)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers left running 5 s after the signal: {alive}"
    output, _ = bench.communicate(timeout=300)
    assert bench.returncode == 130, output
    _, alive = psutil.wait_procs(children, timeout=5)  # the resource tracker ends with the parent
    assert not alive, f"processes left running after the bench exited: {alive}"
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["partial"] and "Partial run" in (out / "report.md").read_text()
    assert "## Summary" in output and "## Verdict" not in output and f"markdown: {out / 'report.md'}" in output
    cells = {(row["dataset"], row["model"], row["defence"]) for row in results["rows"]}
    assert len(cells) < 15
    if signum == signal.SIGINT:  # --resume finishes the recorded run from the cache
        resumed = _bench(out, cache, "--resume")
        output, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, output
        results = json.loads((out / "results.json").read_text())
        assert not results["config"]["partial"] and results["config"]["attacks"] == ["threshold", "knockoff-adaptive"]
        assert {(row["dataset"], row["model"], row["defence"]) for row in results["rows"]} >= cells
        assert len({(row["dataset"], row["model"], row["defence"]) for row in results["rows"]}) == 15


def test_cache_keys_change_with_the_code(tmp_path, monkeypatch):
    package = tmp_path / "somecode"
    package.mkdir()
    (package / "__init__.py").write_text("ANSWER = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("benchmarks.cache.PACKAGES", ("somecode",))
    code_digest.cache_clear()
    before = digest("cell", 1)
    (package / "__init__.py").write_text("ANSWER = 2\n")
    code_digest.cache_clear()
    assert digest("cell", 1) != before
    code_digest.cache_clear()  # the next caller digests the real packages
