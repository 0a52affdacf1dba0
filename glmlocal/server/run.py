"""`glmlocal serve`: bind policy check, port reservation, model load, then uvicorn until interrupted.

The listening socket is opened before the (slow) model load, so a busy port or a refused bind fails in a
second with one clear line, and `--port 0` picks a free port that is printed once the model is ready.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from glmlocal.engine.spec import SpecConfig
from glmlocal.errors import InputError
from glmlocal.launch import LoadedModel, open_model
from glmlocal.plan.options import PlanOptions
from glmlocal.server.app import ServerConfig, create_app
from glmlocal.server.backend import SessionBackend
from glmlocal.server.security import check_bind, is_loopback
from glmlocal.server.thinking import Mode, ThinkingPolicy

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class ServeArgs:
    """Everything `glmlocal serve` was given (planner inputs travel in `plan`)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    max_queue: int = 16
    parallel: int | None = None  # None: the plan's default for its context
    cors: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    quant: str | None = None
    template: Path | None = None
    thinking: Mode = "request"  # serve --thinking: each API's own semantics, or on / off for every request
    think_budget: int | None = None  # serve --think-budget: a thinking turn's budget when its request names none
    log_level: str = "warning"
    plan: PlanOptions = field(default_factory=PlanOptions)
    spec: SpecConfig | None = None  # --spec / --draft (None: no speculative decoding)


def open_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket now (InputError if the address is taken or invalid)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve --host {host}: {exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        what = {errno.EADDRINUSE: "another program is listening there; stop it or pick another --port",
                errno.EACCES: "ports below 1024 need root; pick another --port",
                errno.EADDRNOTAVAIL: "no network interface has that address; pick another --host"}
        why = what.get(exc.errno, f"{(exc.strerror or str(exc)).lower()}; pick another --port or --host")
        raise InputError(f"cannot listen on {f'[{host}]' if ':' in host else host}:{port}: {why}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def model_aliases(model: LoadedModel, args: ServeArgs) -> tuple[str, ...]:
    """Names the server answers to besides its id: what the user typed, the file name, registry aliases."""
    names = {args.model, Path(model.path).name, Path(model.path).stem, *args.aliases}
    from glmlocal.models.store import lookup_model

    spec = lookup_model(model.name) if model.name else None
    if spec is not None:
        names.update((spec.name, *spec.aliases))
    return tuple(sorted(n for n in names if n and n != model.name))


KEEP_ALIVE_S = 75  # seconds an idle keep-alive connection stays open (nginx's default)

def url_of(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def parallel_line(parallel: int, args: ServeArgs) -> str:
    """What the start line says about concurrency, and where the number came from."""
    why = "--parallel" if args.parallel is not None else "default for this context; --parallel N to change"
    runs = "1 request at a time" if parallel == 1 else f"{parallel} requests at once in one shared KV pool"
    return f"{runs} ({why}); {args.max_queue} more may queue, then 429"


def thinking_line(args: ServeArgs) -> str:
    """What the start line says about thinking: who decides, and the default budget."""
    budget = f"at most {args.think_budget} tokens unless a request says" if args.think_budget else "no budget"
    if args.thinking == "request":
        return f"as each request asks (Anthropic: only with `thinking`; OpenAI: on unless turned off); {budget}"
    return f"{args.thinking} for every request (--thinking {args.thinking})" + (
        f"; {budget}" if args.thinking == "on" else "")


def run_serve(args: ServeArgs, err: TextIO | None = None) -> int:
    """Load the model and serve it until SIGINT/SIGTERM. Returns the exit code."""
    from glmlocal.plan.view import cli_console

    err = err or sys.stderr
    policy = ThinkingPolicy(args.thinking, args.think_budget)  # a bad --thinking fails before the slow load
    api_key = args.api_key or os.environ.get("GLMLOCAL_API_KEY") or None
    check_bind(args.host, api_key, args.insecure)
    with open_socket(args.host, args.port) as sock:  # closed however the load or the server ends
        console = cli_console(file=err)  # a log file or pipe gets whole lines, no wrapping
        model = open_model(args.model, args.plan, console, quant=args.quant, template=args.template,
                           parallel=args.parallel, speculation=args.spec)
        try:
            _serve(model, sock, server_config(model, args, api_key, policy), args, console)
        finally:
            model.close()
    return 0


def server_config(model: LoadedModel, args: ServeArgs, api_key: str | None, policy: ThinkingPolicy) -> ServerConfig:
    """The server's policy for `model` as `glmlocal serve` was asked (its parallel is the engine's)."""
    return ServerConfig(model_id=model.name, aliases=model_aliases(model, args), api_key=api_key,
                        max_queue=args.max_queue, parallel=model.engine.parallel, cors_origins=tuple(args.cors),
                        loopback_only=is_loopback(args.host) and not args.insecure, bind_host=args.host,
                        thinking=policy)


def _serve(model: LoadedModel, sock: socket.socket, config: ServerConfig, args: ServeArgs, console: Console) -> None:
    """Say where and how `model` is served, then run uvicorn on `sock` until SIGINT/SIGTERM."""
    import uvicorn
    from rich.markup import escape

    app = create_app(SessionBackend(model.session), config)
    url = url_of(args.host, sock.getsockname()[1])
    console.print(f"[bold green]serving[/] {model.name} (context {model.n_ctx}) at {url}")
    console.print(f"  parallel:  {parallel_line(config.parallel, args)}")
    if model.speculation is not None:
        console.print(f"  drafts:    {escape(model.speculation.describe())}")
    console.print(f"  OpenAI:    base_url={url}/v1   Anthropic / Claude Code: ANTHROPIC_BASE_URL={url}")
    console.print(f"  thinking:  {thinking_line(args)}")
    # Keep idle connections longer than clients pool them (httpx 5 s, undici 4 s): with uvicorn's 5 s
    # default, a request sent as the server closes the socket fails (encode/httpx#2487).
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                           timeout_keep_alive=KEEP_ALIVE_S,
                                           access_log=args.log_level in ("info", "debug")))
    server.run(sockets=[sock])
