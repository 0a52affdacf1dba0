"""`glmlocal chat` start-up: MODEL -> GGUF -> placement -> engine (with a progress bar) -> Session.

Presentation glue only: every decision is made by store / planner / engine / session; this module shows the
placement and the load progress, and hands the REPL what it needs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from glmlocal.chat_view import placement_table
from glmlocal.errors import InputError


@dataclass
class PlanOptions:
    """Planner overrides from the command line (None = let the planner decide)."""

    ctx: int | None = None
    kv_type: str | None = None
    gpu_mem: str | None = None
    ram: str | None = None
    cpu_only: bool = False
    threads: int | None = None
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers (HOST:PORT) used as GPUs
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatModel:
    """A loaded model ready to chat: the session plus what the screens show about it."""

    session: Any
    engine: Any
    name: str
    path: Path
    family: str
    placement: Any
    info: list[tuple[str, str]]

    @property
    def n_ctx(self) -> int:
        return int(self.engine.n_ctx)

    def close(self) -> None:
        self.engine.close()


def plan_for(path: Path, opts: PlanOptions) -> Any:
    """Plan the placement for this machine with the user's overrides."""
    from glmlocal import hardware, planner

    hw = hardware.probe(hardware.Overrides(gpu_mem=opts.gpu_mem, ram=opts.ram, cpu_only=opts.cpu_only,
                                           cores=opts.threads, rpc=opts.rpc))  # fmt: skip
    kwargs: dict[str, Any] = dict(opts.extra)
    if opts.kv_type:
        kwargs["kv_type"] = opts.kv_type
    return planner.plan(planner.footprint_from_gguf(path), hw, ctx=opts.ctx, **kwargs)


def load_with_progress(path: Path, placement: Any, console: Console) -> Any:
    """Engine.load with a Rich progress bar fed by llama.cpp's load callback."""
    from glmlocal.engine import Engine

    columns = (TextColumn("[bold]loading[/] {task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(path.name, total=1.0)
        engine = Engine.load(path, placement, progress=lambda f: bar.update(task, completed=f))
    return engine


def open_chat_model(spec: str, opts: PlanOptions, console: Console, *, quant: str | None = None,
                    template: Path | None = None, family: str | None = None) -> ChatModel:  # fmt: skip
    """Resolve, plan, load and wrap MODEL in a Session; the console shows placement and progress."""
    from glmlocal.glm.template import ChatTemplate, family_from_template
    from glmlocal.session import Session
    from glmlocal.store import resolve_model

    resolved = resolve_model(spec, quant=quant)
    path = resolved.require_gguf()
    placement = plan_for(path, opts)
    name = resolved.name or path.name
    console.print(placement_table(placement, name))
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
            ("context", str(engine.n_ctx))]  # fmt: skip
    flags: Callable[[], str] | None = getattr(placement, "llama_cpp_flags", None)
    if flags is not None:
        info.append(("llama.cpp flags", flags()))
    return ChatModel(session, engine, name, path, fam, placement, info)


@dataclass
class ChatArgs:
    """Everything `glmlocal chat` was given."""

    model: str
    plan: PlanOptions = field(default_factory=PlanOptions)
    quant: str | None = None
    system: str | None = None
    think: bool = True
    show_thinking: bool = False
    tools: Path | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    template: Path | None = None
    family: str | None = None
    each_line: bool = False
    resume: bool = False


def turn_options(args: ChatArgs) -> dict[str, Any]:
    """Extra keyword arguments for Session.turn (sampling), only those the user set."""
    if args.temperature is None and args.seed is None:
        return {}
    from glmlocal.generation import Sampling

    sampling = Sampling()
    changes = {k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}
    return {"sampling": replace(sampling, **changes)}


def chats_dir() -> Path:
    """Autosaved chats live in the store directory ($GLMLOCAL_HOME/chats)."""
    from glmlocal.store import home

    return home() / "chats"


def start_conversation(args: ChatArgs, tools: list | None) -> tuple[Any, Path]:
    """A new conversation and its autosave file, or with --resume the latest saved one (flags still win)."""
    from glmlocal.chat_transcript import Conversation, latest_chat, new_chat_path

    if not args.resume:
        conv = Conversation(system=args.system, tools=tools, enable_thinking=args.think)
        return conv, new_chat_path(chats_dir())
    path = latest_chat(chats_dir())
    if path is None:
        raise InputError(f"no saved chat to resume in {chats_dir()}", hint="start one with: glmlocal chat MODEL")
    conv = Conversation.load(path)
    conv.system = args.system if args.system is not None else conv.system
    conv.tools = tools or conv.tools
    conv.enable_thinking = conv.enable_thinking and args.think
    return conv, path


def run_chat(args: ChatArgs, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The `glmlocal chat` command: interactive when stdin is a terminal, else piped. Returns the exit code."""
    from glmlocal.chat_piped import PipedChat, split_prompts
    from glmlocal.chat_transcript import load_tools

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tools = load_tools(args.tools) if args.tools else None  # bad input fails before the slow load
    piped = not stdin.isatty()
    prompts = split_prompts(stdin.read(), args.each_line) if piped else []
    if piped and not prompts:
        sys.stderr.write("error: no prompt on standard input\n")
        return 2
    conv, autosave = start_conversation(args, tools)
    # Piped: the plan and load progress go to stderr, and only when a person is watching it.
    console = Console(stderr=True, quiet=not sys.stderr.isatty()) if piped else Console(file=stdout)
    model = open_chat_model(args.model, args.plan, console, quant=args.quant, template=args.template,
                            family=args.family)  # fmt: skip
    conv.model = model.name
    try:
        if piped:
            chat = PipedChat(model.session, conv, out=stdout, err=sys.stderr, show_thinking=args.show_thinking,
                             max_tokens=args.max_tokens, turn_kwargs=turn_options(args))  # fmt: skip
            code = chat.run(prompts)
            if args.resume:  # `echo "and then?" | glmlocal chat M --resume` extends the saved chat
                conv.save(autosave)
            return code
        return interactive(model, conv, args, console, autosave)
    finally:
        model.close()


def interactive(model: ChatModel, conv: Any, args: ChatArgs, console: Console, autosave: Path) -> int:
    from glmlocal.chat import ChatREPL
    from glmlocal.chat_input import PromptReader, default_history_path

    repl = ChatREPL(model.session, conv, console=console, reader=PromptReader(default_history_path()),
                    n_ctx=model.n_ctx, show_thinking=args.show_thinking,
                    max_tokens=args.max_tokens, info=model.info, turn_kwargs=turn_options(args),
                    autosave=autosave)  # fmt: skip
    return repl.run()
