"""The whole ``guard`` command as installed with the harness: ``bench`` and ``audit`` registered through
the ``predguard.commands`` entry-point group, and every command's options."""
from __future__ import annotations

import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import typer
from harness_cli import app
from typer.testing import CliRunner

from guard import cli
from guard.cli import COMMANDS, add_commands

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_the_harness_registers_bench_and_audit_through_the_entry_point_group(monkeypatch):
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    entries = [EntryPoint(name, value, COMMANDS)
               for name, value in declared["project"]["entry-points"][COMMANDS].items()]
    monkeypatch.setattr(cli, "entry_points", lambda group: entries if group == COMMANDS else [])
    command = typer.Typer()
    command.callback()(lambda: None)
    add_commands(command)
    listed = CliRunner().invoke(command, ["--help"], env={"COLUMNS": "250"}).output
    assert "bench" in listed and "audit" in listed


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
