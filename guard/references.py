"""``"module:name"`` references: the user code policies (``features_function``) and commands
(``--model``) name, and the registries of choices the commands check names against."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def resolve(reference: str, what: str = "name") -> Any:
    """The object a ``"module:name"`` reference names (``what`` it should be, for the errors)."""
    module, _, name = reference.partition(":")
    if not module or not name:
        raise ValueError(f"{reference!r} is not a 'module:{what}' reference")
    found = getattr(importlib.import_module(module), name, None)
    if found is None:
        raise ValueError(f"{reference!r} does not name a {what}")
    return found


def import_function(reference: str) -> Callable:
    """The callable a ``"module:function"`` reference names."""
    function = resolve(reference, "function")
    if not callable(function):
        raise ValueError(f"{reference!r} does not name a function")
    return function
