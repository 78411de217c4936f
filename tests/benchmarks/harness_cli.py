"""The ``guard`` command as an installed predguard has it, for the harness's tests: with ``bench`` and
``audit``, which the harness registers through the ``predguard.commands`` entry-point group (the
installed metadata may be another checkout's)."""
from benchmarks.cli import register
from guard.cli import app

if not any(command.name == "bench" for command in app.registered_commands):
    register(app)

__all__ = ["app"]
