"""Option parsers of the ``guard`` command, shared with the commands other packages register: names
checked against a registry imported only when needed, and help that lists the choices."""
from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

from guard.references import resolve


class Names:
    """A parser of names from a registry (``module:attribute``: a tuple or the keys of a dict) that
    is imported only when a value is checked or a ``ListsChoices`` help lists them, so ``guard
    --help`` stays fast and the choices shown are the real ones; ``several``: comma-separated."""

    def __init__(self, registry: str, several: bool = False) -> None:
        self.registry, self.several = registry, several
        self.__name__ = "names" if several else "name"

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(resolve(self.registry))

    def __call__(self, value: str) -> str:
        names = [name for name in value.split(",") if name] if self.several else [value]
        unknown = [name for name in names if name not in self.choices]
        if unknown or not names:
            raise typer.BadParameter(f"{', '.join(unknown) or 'nothing'} is not a choice; choose from "
                                     f"{', '.join(self.choices)}")
        return ",".join(names)


class ListsChoices(TyperCommand):
    """A command whose ``--help`` lists the choices of its ``Names`` options."""

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        for param in self.params:
            names = getattr(param.type_descriptor.parameter_info, "parser", None)
            if isinstance(names, Names) and "Choose from" not in (param.help or ""):
                param.help = f"{param.help or ''} Choose from: {', '.join(names.choices)}.".strip()
        super().format_help(ctx, formatter)


def split_names(values: list[str] | None) -> tuple[str, ...] | None:
    """Comma- or repeat-separated names (checked by ``Names``) as one tuple; None when none."""
    return tuple(name for value in values for name in value.split(",") if name) if values else None
