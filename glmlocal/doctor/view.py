"""Rich rendering of `glmlocal doctor` (presentation only; the checks live in glmlocal/doctor.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console

from glmlocal.doctor.checks import Check, run_checks, smoke_check

_MARK = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]"}


def _show(console: Console, c: Check) -> None:
    console.print(f"{_MARK.get(c.status, '?')} [bold]{c.name}[/]: {c.detail}", highlight=False)
    if c.fix:
        console.print(f"    fix: [cyan]{c.fix}[/]", highlight=False, soft_wrap=True)


def run_doctor(*, smoke_only: bool = False, as_json: bool = False) -> int:
    """Run the checks, print them as they complete; exit code 1 when any check failed."""
    console = Console(stderr=False)
    show = None if as_json else (lambda c: _show(console, c))
    if smoke_only:
        checks = [smoke_check()]
        if show:
            show(checks[0])
    else:
        if show:
            console.print("[dim]checking llama.cpp, GPUs, RAM, disk; then a tiny end-to-end generation…[/]")
        checks = run_checks(on_check=show)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    return 1 if any(c.status == "fail" for c in checks) else 0
