"""The guard command: loopback-only serving, and the demo end to end under uvicorn."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from importlib.metadata import EntryPoint
from pathlib import Path

import httpx
import numpy as np
import pytest
import typer
from conftest import free_port, wait_until_serving
from harness_cli import app
from typer.testing import CliRunner

from guard import cli
from guard.cli import COMMANDS, add_commands, is_loopback

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                         ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                         ("::", False), ("example.com", False)])
def test_only_loopback_hosts_count_as_local(host, local):
    assert is_loopback(host) is local


def test_demo_refuses_remote_hosts_without_allow_remote():
    result = CliRunner().invoke(app, ["demo", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--allow-remote" in result.output


def test_demo_serves_a_guarded_model_over_http(digits, digits_split):
    port = free_port()
    command = [sys.executable, "-c", "from guard.cli import main; main()",
               "demo", "--port", str(port), "--epochs", "5"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, 120, server)
        X = digits.X[digits_split.test[:20]]
        served = httpx.post(f"{url}/predict", json={"features": X.tolist()}).json()["probabilities"]
        served = np.asarray(served)
        np.testing.assert_allclose(served * 100, np.rint(served * 100), atol=1e-9)  # round:2 on the wire
        np.testing.assert_allclose(served.sum(axis=1), 1.0)
        assert (served.argmax(axis=1) == digits.y[digits_split.test[:20]]).mean() >= 0.7
        assert httpx.post(f"{url}/predict", content=b"{not json").status_code == 400
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert re.search(r"curl -s -X POST http://127\.0\.0\.1:\d+/predict", output)
    assert "training an MLP on digits" in output and "what the guard sends (round:2)" in output
    assert "guard: POST /predict -> 400 invalid_json" in output  # under uvicorn's logging


def test_the_harness_registers_bench_and_audit_through_the_entry_point_group(monkeypatch):
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    entries = [EntryPoint(name, value, COMMANDS)
               for name, value in declared["project"]["entry-points"][COMMANDS].items()]
    monkeypatch.setattr(cli, "entry_points", lambda group: entries if group == COMMANDS else [])
    command = typer.Typer()
    command.callback()(lambda: None)
    add_commands(command)
    listed = CliRunner().invoke(command, ["--help"], env={"COLUMNS": "250"}).output
    assert "bench" in listed and "audit" in listed


def test_the_runtime_commands_need_only_the_library():
    code = ("import sys, guard.cli; loaded = sorted({m.split('.')[0] for m in sys.modules} & {'attacks', "
            "'benchmarks'}); print(loaded)")
    script = f"import importlib.metadata as m; m.entry_points = lambda group: []; {code}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_takes_its_data_as_data():
    for command in ("train-dp", "calibrate", "bench", "audit"):
        options = set(re.findall(r"--[a-z-]+", _help(command)))
        assert "--data" in options and not options & {"--dataset", "--datasets", "--csv"}, command


@pytest.mark.parametrize("command, option, choices, required", [
    ("train-dp", "--optimizer", ["adam", "sgd"], ["--data", "x.csv", "--out", "o", "--target-epsilon", "1"]),
    ("train-dp", "--accountant", ["prv", "rdp"], ["--data", "x.csv", "--out", "o", "--target-epsilon", "1"]),
    ("train-dp", "--grad-sample-mode", ["hooks", "functorch", "ew", "ghost"],
     ["--data", "x.csv", "--out", "o", "--target-epsilon", "1"]),
    ("bench", "--activation", ["relu", "sigmoid", "tanh"], []),
    ("bench", "--defences", ["none", "label_only"], []),
    ("bench", "--attacks", ["copycat", "lira-online"], []),
    ("calibrate", "--detector", ["prada", "similarity"], ["guard.toml", "--data", "digits"]),
    ("audit", "--attacks", ["copycat", "mi-face-blackbox"], ["--url", "http://127.0.0.1:9/p"]),
])
def test_options_with_fixed_choices_list_them_and_refuse_others(command, option, choices, required):
    help_text = " ".join(_help(command).split())
    listed = help_text.split(option, 1)[1].split(" --", 1)[0]
    assert all(choice in listed for choice in choices), listed
    result = CliRunner().invoke(app, [command, *required, option, "no-such-choice"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if "no-such-choice" in line]
    assert choices[0] in error  # one line that names the choices
