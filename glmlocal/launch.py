"""Open a model for chat, serve or a benchmark: MODEL -> GGUF -> placement -> engine -> Session.

The one place the front ends (glmlocal.chat, glmlocal.server, bench/) call to get a running model. Given a
console it shows the placement and a load progress bar there; every decision is made below (store, planner,
engine, glm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from glmlocal.engine.engine import Engine
from glmlocal.engine.session import Session
from glmlocal.engine.spec import SpecConfig, SpecSetup, decide
from glmlocal.glm.template import ChatTemplate, family_from_template
from glmlocal.models.store import resolve_model
from glmlocal.plan.footprint import footprint_from_gguf
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
    speculation: SpecSetup | None = None  # what drafts run, and why (None: the caller did not ask)

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def close(self) -> None:
        self.engine.close()


def load_with_progress(path: Path, placement: Placement, console: Console, spec: SpecSetup | None = None,
                       parallel: int = 1) -> Engine:
    """Engine.load with a Rich progress bar fed by llama.cpp's load callback."""
    columns = (TextColumn("[bold]loading[/] {task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(path.name, total=1.0)
        return Engine.load(path, placement, progress=lambda f: bar.update(task, completed=f), parallel=parallel,
                           spec=spec)


def open_model(spec: str, options: PlanOptions, console: Console, *, quant: str | None = None,
               template: Path | None = None, family: str | None = None, parallel: int | None = 1,
               speculation: SpecConfig | None = None) -> LoadedModel:
    """Resolve, plan, load and wrap MODEL in a Session; the console shows placement and progress.
    `parallel` sequences are decoded together (None: the plan's default for its context). `speculation`
    (--spec / --draft) is decided against the GGUF and the plan before loading (bad combinations raise here)."""
    resolved = resolve_model(spec, quant=quant)
    path = resolved.require_gguf()
    if speculation is not None:
        options = replace(options, mtp=speculation.plan_mtp)
    placement = plan_gguf(path, options)
    setup = speculation_setup(path, placement, speculation)
    name = resolved.name or path.name
    console.print(summary_table(placement, f"loading {name}"))
    if setup is not None:
        console.print(f"[dim]speculative[/]  {escape(setup.describe())}")
    if placement.devices:
        console.print(device_table(placement))
    if parallel is None:
        parallel = placement.parallel  # the planner's (glmlocal.plan.planner.default_parallel)
    engine = load_with_progress(path, placement, console, setup, parallel)
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
    if setup is not None:
        info.append(("speculative", setup.describe()))
    return LoadedModel(session, engine, name, path, fam, placement, info, setup)


def speculation_setup(path: Path, placement: Placement, config: SpecConfig | None) -> SpecSetup | None:
    """What --spec / --draft turn on for this GGUF and plan (InputError: MTP asked of a GGUF without NextN)."""
    if config is None:
        return None
    has_nextn = footprint_from_gguf(path).mtp_layer is not None
    return decide(config, has_nextn=has_nextn, planned_mtp=placement.mtp, planned_draft=placement.mtp_draft)
