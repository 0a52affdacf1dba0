"""Rich rendering of `glmlocal doctor` (presentation only; the checks live in checks.py and memory.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console
from rich.text import Text

from glmlocal.doctor.checks import Check, run_checks, smoke_check
from glmlocal.plan.view import cli_console

_MARK = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "red")}


def _show(console: Console, c: Check) -> None:
    mark, style = _MARK.get(c.status, ("?", ""))
    console.print(Text.assemble((mark, style), " ", (c.name, "bold"), f": {c.detail}"))
    for line in c.more:
        console.print(Text(f"    {line}"))
    if c.fix:
        console.print(Text.assemble("    fix: ", (c.fix, "cyan")))


def run_doctor(*, smoke_only: bool = False, as_json: bool = False) -> int:
    """Run the checks, print them as they complete; exit code 1 when any check failed."""
    console = cli_console()
    show = None if as_json else (lambda c: _show(console, c))
    if smoke_only:
        checks = [smoke_check()]
        if show:
            show(checks[0])
    else:
        if show:
            console.print(Text("checking llama.cpp, GPUs, RAM, disk; then a tiny end-to-end generation…", style="dim"))
        checks = run_checks(on_check=show)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    return 1 if any(c.status == "fail" for c in checks) else 0
