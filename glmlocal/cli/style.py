"""How `glmlocal --help` looks: conventional metavars instead of Typer's type labels, on every command.

Typer 0.29 shows `{model}` for a required argument and `<str>` / `<bool>` after every option (even `--help`).
These subclasses restyle every parameter a command has, so an option added later looks the same without doing
anything: arguments read `MODEL` (or `[MODEL]` when optional), options `--quant QUANT` (an explicit `metavar=`
wins), flags nothing. They override only display methods of Typer's parameter classes, so the supported
Typer range is pinned in pyproject.toml (tests/test_cli_newcomer.py checks the installed one is inside it).
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperGroup, TyperOption

HELP_OPTION_NAMES = ["-h", "--help"]


class Argument(TyperArgument):
    """MODEL, not {model} <str>."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar if self.metavar is not None else (self.name or "").upper()

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the name says it; the help text says the rest


class Option(TyperOption):
    """--ctx CTX, not --ctx <int> (a path: PATH); a flag shows no value at all."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.metavar is not None:
            return self.metavar or None
        if self.is_flag or self.count:
            return None
        if self.type_descriptor.is_path:
            return "PATH"
        return (self.name or "").upper()


def restyle(params: list) -> None:
    """Give Typer's parameters our display (their state is untouched: same attributes, new methods)."""
    for p in params:
        if type(p) is TyperArgument:
            p.__class__ = Argument
        elif type(p) is TyperOption:
            p.__class__ = Option


class Group(TyperGroup):
    """The top-level group (Typer(cls=Group)): its own options and those of every command it holds restyled,
    however the command was registered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        restyle(self.params)
        for cmd in self.commands.values():
            restyle(cmd.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        restyle([option] if option is not None else [])
        return option

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:  # its help option is made on first use (and then kept): restyle that one too
            help_option = cmd.get_help_option(ctx)
            restyle([help_option] if help_option is not None else [])
        return cmd
