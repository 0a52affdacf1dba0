"""One doctor finding (shared by the checks, their modules and the rendering)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Check:
    """status: "ok" | "warn" | "fail". fix: what to run, when something is wrong. more: lines shown under it."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    data: dict = field(default_factory=dict)
    more: list[str] = field(default_factory=list)
