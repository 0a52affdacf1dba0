"""Open a model for chat, serve or a benchmark: MODEL -> GGUF -> placement -> engine -> Session.

The one place the front ends (glmlocal.chat, glmlocal.server, bench/) call to get a running model. Given a
console it shows the placement and a load progress bar there; every decision is made below (store, planner,
engine, glm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from glmlocal.engine.engine import Engine
from glmlocal.engine.session import Session
from glmlocal.glm.template import ChatTemplate, family_from_template
from glmlocal.models.store import resolve_model
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.placement import Placement
from glmlocal.plan.planner import plan_gguf
from glmlocal.plan.view import device_table, summary_table


@dataclass
class LoadedModel:
    """A loaded model ready for turns: the session plus what the screens show about it."""

    session: Session
    engine: Engine
    name: str
    path: Path
    family: str
    placement: Placement
    info: list[tuple[str, str]]

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def close(self) -> None:
        self.engine.close()


def load_with_progress(path: Path, placement: Placement, console: Console) -> Engine:
    """Engine.load with a Rich progress bar fed by llama.cpp's load callback."""
    columns = (TextColumn("[bold]loading[/] {task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(path.name, total=1.0)
        return Engine.load(path, placement, progress=lambda f: bar.update(task, completed=f))


def open_model(spec: str, options: PlanOptions, console: Console, *, quant: str | None = None,
               template: Path | None = None, family: str | None = None) -> LoadedModel:
    """Resolve, plan, load and wrap MODEL in a Session; the console shows placement and progress."""
    resolved = resolve_model(spec, quant=quant)
    path = resolved.require_gguf()
    placement = plan_gguf(path, options)
    name = resolved.name or path.name
    console.print(summary_table(placement, f"loading {name}"))
    if placement.devices:
        console.print(device_table(placement))
    engine = load_with_progress(path, placement, console)
    try:
        embedded = engine.metadata("tokenizer.chat_template")
        fam = family or resolved.family or family_from_template(embedded)
        tmpl = ChatTemplate.for_model({"tokenizer.chat_template": embedded} if embedded else None, fam, template)
        session = Session(engine, tmpl, fam)
    except BaseException:
        engine.close()
        raise
    info = [("model", f"{name} ({path})"), ("family", fam), ("template", tmpl.origin),
            ("context", str(engine.n_ctx)), ("llama.cpp flags", placement.llama_cpp_flags())]  # fmt: skip
    return LoadedModel(session, engine, name, path, fam, placement, info)
