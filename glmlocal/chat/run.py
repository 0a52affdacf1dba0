"""`glmlocal chat`: the command's arguments, the conversation to start (new or --resume), then the REPL or the
piped mode on a model opened by glmlocal.launch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from rich.console import Console

from glmlocal.chat.input import PromptReader, default_history_path
from glmlocal.chat.piped import PipedChat, split_prompts
from glmlocal.chat.repl import ChatREPL
from glmlocal.chat.transcript import (
    Conversation,
    latest_chat,
    load_tools,
    new_chat_path,
)
from glmlocal.engine.generation import Sampling
from glmlocal.engine.spec import SpecConfig
from glmlocal.errors import InputError
from glmlocal.launch import LoadedModel, open_model
from glmlocal.models.store import home, resolve_model
from glmlocal.plan.options import PlanOptions


@dataclass
class ChatArgs:
    """Everything `glmlocal chat` was given."""

    model: str
    plan: PlanOptions = field(default_factory=PlanOptions)
    quant: str | None = None
    system: str | None = None
    think: bool = True
    think_budget: int | None = None  # --think-budget: most tokens a reply may think (/think N)
    show_thinking: bool = False
    tools: Path | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    template: Path | None = None
    family: str | None = None
    each_line: bool = False
    resume: bool = False
    spec: SpecConfig | None = None  # --spec / --draft (None: no speculative decoding)


def turn_options(args: ChatArgs) -> dict[str, object]:
    """Extra keyword arguments for Session.turn (sampling), only those the user set."""
    if args.temperature is None and args.seed is None:
        return {}
    sampling = Sampling()
    changes = {k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}
    return {"sampling": replace(sampling, **changes)}


def chats_dir() -> Path:
    """Autosaved chats live in the store directory ($GLMLOCAL_HOME/chats)."""
    return home() / "chats"


def start_conversation(args: ChatArgs, tools: list | None) -> tuple[Conversation, Path]:
    """A new conversation and its autosave file, or with --resume the latest saved one (flags still win)."""
    if not args.resume:
        conv = Conversation(system=args.system, tools=tools, enable_thinking=args.think,
                            think_budget=args.think_budget)
        return conv, new_chat_path(chats_dir())
    path = latest_chat(chats_dir())
    if path is None:
        raise InputError(f"no saved chat to resume in {chats_dir()}", hint="start one with: glmlocal chat MODEL")
    conv = Conversation.load(path)
    conv.system = args.system if args.system is not None else conv.system
    conv.tools = tools or conv.tools
    conv.enable_thinking = conv.enable_thinking and args.think
    conv.think_budget = args.think_budget if args.think_budget is not None else conv.think_budget
    return conv, path


def run_chat(args: ChatArgs, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The `glmlocal chat` command: interactive when stdin is a terminal, else piped. Returns the exit code."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    # Bad input fails before the slow load, the model first: a missing file is the first thing to fix.
    resolve_model(args.model, quant=args.quant).require_gguf()
    tools = load_tools(args.tools) if args.tools else None
    piped = not stdin.isatty()
    prompts = split_prompts(stdin.read(), args.each_line) if piped else []
    if piped and not prompts:
        sys.stderr.write("error: no prompt on standard input\n")
        return 2
    conv, autosave = start_conversation(args, tools)
    # Piped: the plan and load progress go to stderr, and only when a person is watching it.
    console = Console(stderr=True, quiet=not sys.stderr.isatty()) if piped else Console(file=stdout)
    model = open_model(args.model, args.plan, console, quant=args.quant, template=args.template,
                            family=args.family, speculation=args.spec)  # fmt: skip
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


def interactive(model: LoadedModel, conv: Conversation, args: ChatArgs, console: Console, autosave: Path) -> int:
    repl = ChatREPL(model.session, conv, console=console, reader=PromptReader(default_history_path()),
                    n_ctx=model.n_ctx, show_thinking=args.show_thinking,
                    max_tokens=args.max_tokens, info=model.info, turn_kwargs=turn_options(args),
                    autosave=autosave)  # fmt: skip
    return repl.run()
