"""``"module:function"`` references, as policies (``features_function``) and commands (``--model``)
name user code."""
from __future__ import annotations

import importlib
from collections.abc import Callable


def import_function(reference: str) -> Callable:
    """The callable a ``"module:function"`` reference names."""
    module, _, name = reference.partition(":")
    if not module or not name:
        raise ValueError(f"{reference!r} is not a 'module:function' reference")
    function = getattr(importlib.import_module(module), name, None)
    if not callable(function):
        raise ValueError(f"{reference!r} does not name a function")
    return function
