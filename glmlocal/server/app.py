"""The FastAPI app: routes for OpenAI Chat Completions and Anthropic Messages on one engine.

`create_app(backend, config)` wires pure adapters (openai.py, anthropic.py) to a `Backend` (the engine, or a
fake in unit tests) through the FIFO `Scheduler`. Generation runs on the scheduler's worker thread; the event
loop only translates and writes. A client that disconnects - streamed or not - closes its ticket, which sets
the cancel Event the engine checks between tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmlocal.engine.session import PreparedTurn, ThinkRoomError, think_limit
from glmlocal.errors import ContextOverflowError, GlmlocalError
from glmlocal.server import anthropic as an
from glmlocal.server import openai as oa
from glmlocal.server import responses as rs
from glmlocal.server import responses_request as rq
from glmlocal.server.errors import APIError, from_exception
from glmlocal.server.scheduler import ClientGone, Scheduler, Ticket
from glmlocal.server.security import (
    AuthMiddleware,
    BodyLimitMiddleware,
    OriginGuard,
    is_anthropic_path,
)
from glmlocal.server.thinking import ThinkingPolicy
from glmlocal.server.types import (
    ChatItem,
    CompletionItem,
    CompletionRequest,
    TurnRequest,
)


class Backend(Protocol):
    """What the server needs from a loaded model. `prepare` renders and tokenizes a chat turn, `tokenize` a raw
    completion prompt (off the event loop, before queueing: it sizes the request); `chat` and `complete`
    generate from those tokens, so a request is rendered and tokenized once. `chat`/`complete` block and run on
    the worker thread; they yield events (glm/events.py, or TextDelta) and finally one `Usage`."""

    n_ctx: int

    def prepare(self, turn: TurnRequest) -> PreparedTurn: ...
    def tokenize(self, text: str) -> list[int]: ...
    def cached_prefix(self, prepared: PreparedTurn) -> int: ...
    def chat(self, turn: TurnRequest, prepared: PreparedTurn, cancel: threading.Event) -> Iterator[ChatItem]: ...
    def complete(self, req: CompletionRequest, tokens: list[int],
                 cancel: threading.Event) -> Iterator[CompletionItem]: ...


class Sink(Protocol):
    """A non-streamed response being built from a backend's items (the adapters' *Aggregate classes)."""

    def feed(self, item: ChatItem | CompletionItem) -> object: ...


@dataclass
class ServerConfig:
    """Server policy. `aliases` are extra model names accepted besides `model_id` (case-insensitive)."""

    model_id: str = "glm"
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_queue: int = 16
    parallel: int = 1  # requests running at once (the engine's parallel)
    max_body_bytes: int = 32 << 20
    cors_origins: tuple[str, ...] = ()
    loopback_only: bool = False  # listening on loopback: refuse requests whose Host is not a loopback name
    bind_host: str = "127.0.0.1"
    thinking: ThinkingPolicy = field(default_factory=ThinkingPolicy)  # serve --thinking, --think-budget
    heartbeat_s: float = 10.0
    coalesce_s: float = 0.02  # gather tokens this long between stream writes (0 = write each token)
    created: int = field(default_factory=lambda: int(time.time()))

    def accepts(self, name: str | None, *, anthropic: bool = False) -> bool:
        """The served id, an alias (with or without a `:quant` tag), or - for Claude Code, which asks for
        claude-* models unless ANTHROPIC_MODEL is set - any claude-* name on the Anthropic route."""
        if not name:
            return True
        known = {n.lower() for n in (self.model_id, *self.aliases)}
        lowered = name.strip().lower()
        return lowered in known or lowered.split(":")[0] in known or (anthropic and lowered.startswith("claude"))


def create_app(backend: Backend, config: ServerConfig) -> FastAPI:
    """Build the ASGI app serving `backend` under `config`."""
    app = FastAPI(title="glmlocal", version="0.1.0", description="Local GLM endpoint: OpenAI (Chat Completions, Responses) and Anthropic APIs")
    app.state.backend, app.state.config = backend, config
    app.state.scheduler = Scheduler(config.max_queue, config.parallel)
    _install_errors(app)
    _install_middleware(app, config)
    _openai_routes(app, backend, config)
    _anthropic_routes(app, backend, config)
    _responses_routes(app, backend, config)
    _info_routes(app, backend, config)
    app.router.on_shutdown.append(app.state.scheduler.shutdown)
    return app


# ---------------------------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------------------------
# uvicorn configures this logger, so refusals show on the server console at the default --log-level:
# when an agent reports a failure, the person running `glmlocal serve` can see why.
log = logging.getLogger("uvicorn.error")


def _error_response(path: str, err: APIError) -> JSONResponse:
    log.warning("%s -> %d: %s", path, err.status, err.message)
    body = err.anthropic_body() if is_anthropic_path(path) else err.openai_body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return _error_response(request.url.path, exc)

    @app.exception_handler(GlmlocalError)
    async def _typed(request: Request, exc: GlmlocalError):
        return _error_response(request.url.path, from_exception(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(request.url.path, APIError(400, _validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return _error_response(request.url.path, from_exception(exc))


def _install_middleware(app: FastAPI, config: ServerConfig) -> None:
    # Starlette wraps in reverse order of addition: CORS (if asked) outermost, then the origin/host guard,
    # size limit, auth.
    if config.api_key:
        app.add_middleware(AuthMiddleware, api_key=config.api_key)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    app.add_middleware(OriginGuard, cors_origins=config.cors_origins, loopback_only=config.loopback_only,
                       extra_hosts=(config.bind_host,))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"])


async def _preflight_chat(backend: Backend, turn: TurnRequest, max_param: str = "max_tokens") -> PreparedTurn:
    """Render and tokenize the prompt off the event loop (the turn reuses it); 400 before anything is queued if
    it cannot fit or max_tokens (the API's `max_param`) cannot hold a forced call; too large a max_tokens is
    clamped (agents ask for 32K by habit)."""
    prepared = await asyncio.to_thread(backend.prepare, turn)
    _fit(backend, len(prepared.tokens), turn)
    try:
        think_limit(prepared, turn.think_budget, turn.max_tokens or 0)
    except ThinkRoomError as exc:
        raise APIError(400, exc.one_line().replace("max_tokens", max_param, 1), param=max_param) from None
    return prepared


def _fit(backend: Backend, prompt_tokens: int, req: TurnRequest | CompletionRequest) -> None:
    if prompt_tokens >= backend.n_ctx:
        raise ContextOverflowError(prompt_tokens, req.max_tokens or 0, backend.n_ctx)
    room = backend.n_ctx - prompt_tokens
    req.max_tokens = min(req.max_tokens or room, room)


def _check_model(config: ServerConfig, name: str | None, *, anthropic: bool = False) -> None:
    if not config.accepts(name, anthropic=anthropic):
        raise APIError(404, f"model {name!r} not found; this server serves {config.model_id!r}",
                       param="model", code="model_not_found")


async def _watch_disconnect(request: Request, ticket: Ticket) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.close()
            return


async def _collect(request: Request, ticket: Ticket, run: Callable, sink: Sink) -> None:
    """Run a non-streamed request, feeding `sink`; a client that disconnects cancels it."""
    watcher = asyncio.create_task(_watch_disconnect(request, ticket))
    try:
        async for batch in ticket.stream(run):
            for item in batch:
                sink.feed(item)
    except ClientGone:
        raise APIError(499, "client closed the request") from None
    finally:
        watcher.cancel()
        ticket.close()


class EventStream(Response):
    """SSE response that watches for the client leaving the whole time - including while the request waits
    in the queue or the prompt is processed, when nothing is being written - and then cancels it."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], ticket: Ticket):
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no Content-Length
        self.events, self.ticket = body, ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, send, tg.cancel_scope)
                tg.start_soon(self._watch, receive, tg.cancel_scope)
        finally:
            self.ticket.close()
            with anyio.CancelScope(shield=True):
                await self.events.aclose()

    async def _write(self, send, scope: anyio.CancelScope) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        scope.cancel()

    async def _watch(self, receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.ticket.close()
        scope.cancel()


def _sse_data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------------------------
async def _sse_stream(ticket: Ticket, run: Callable, config: ServerConfig, *, first: bytes,
                      frames: Callable[[ChatItem | CompletionItem], bytes], ping: bytes,
                      on_error: Callable[[Exception], bytes],
                      last: bytes = b"") -> AsyncIterator[bytes]:
    """One SSE response in some API's shape: its opening frames, each batch of turn items as frames (a ping
    while nothing comes), its closing frame; after the 200 went out, errors travel in-band (the SDKs raise
    them). The ticket is released however the stream ends, a client that left included."""
    yield first
    try:
        async for batch in ticket.stream(run, heartbeat=config.heartbeat_s, coalesce=config.coalesce_s):
            out = b"".join(frames(item) for item in batch)
            yield out or (b"" if batch else ping)
        if last:
            yield last
    except ClientGone:
        return
    except Exception as exc:  # noqa: BLE001 - reported in the stream, in the API's own error shape
        yield on_error(exc)
    finally:
        ticket.close()


def _openai_events(ticket: Ticket, run: Callable, feed: Callable, first: list[dict],
                   config: ServerConfig) -> AsyncIterator[bytes]:
    return _sse_stream(ticket, run, config, first=b"".join(_sse_data(c) for c in first),
                       frames=lambda item: b"".join(_sse_data(c) for c in feed(item)), ping=b": ping\n\n",
                       on_error=lambda exc: _sse_data(from_exception(exc).openai_body()),
                       last=b"data: [DONE]\n\n")


def _openai_routes(app: FastAPI, backend: Backend, config: ServerConfig) -> None:
    scheduler: Scheduler = app.state.scheduler

    # Also without the /v1 prefix, as llama.cpp's server answers: a client whose base URL lacks /v1 still works.
    @app.post("/chat/completions", include_in_schema=False)
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        """OpenAI Chat Completions, streamed (SSE) or not."""
        _check_model(config, body.model)
        turn = oa.to_turn(body, config.thinking)
        prepared = await _preflight_chat(backend, turn)
        ticket = scheduler.reserve()
        run = lambda cancel: backend.chat(turn, prepared, cancel)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            stream = oa.ChatStream(config.model_id, include_usage=include)
            return EventStream(_openai_events(ticket, run, stream.feed, [stream.start()], config), ticket)
        sink = oa.ChatAggregate(config.model_id)
        await _collect(request, ticket, run, sink)
        return sink.response()

    @app.post("/completions", include_in_schema=False)
    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: oa.CompletionBody, request: Request):
        """OpenAI (legacy) text completions: the raw prompt, no chat template."""
        _check_model(config, body.model)
        req = oa.to_completion(body)
        tokens = await asyncio.to_thread(backend.tokenize, req.prompt)
        _fit(backend, len(tokens), req)
        ticket = scheduler.reserve()
        run = lambda cancel: backend.complete(req, tokens, cancel)
        stream = oa.CompletionStream(config.model_id)
        if body.stream:
            return EventStream(_openai_events(ticket, run, stream.feed, [], config), ticket)
        await _collect(request, ticket, run, stream)
        return stream.response()


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------
def _anthropic_events(ticket: Ticket, run: Callable, stream: an.MessageStream,
                      config: ServerConfig) -> AsyncIterator[bytes]:
    return _sse_stream(ticket, run, config, first=b"".join(an.sse(name, data) for name, data in stream.start()),
                       frames=lambda item: b"".join(an.sse(name, data) for name, data in stream.feed(item)),
                       ping=an.sse("ping", {"type": "ping"}),
                       on_error=lambda exc: an.sse("error", from_exception(exc).anthropic_body()))


def _anthropic_routes(app: FastAPI, backend: Backend, config: ServerConfig) -> None:
    scheduler: Scheduler = app.state.scheduler

    @app.post("/v1/messages", tags=["anthropic"])
    async def messages(body: an.MessagesRequest, request: Request):
        """Anthropic Messages, streamed (SSE) or not. Headers anthropic-version/-beta are accepted and ignored."""
        _check_model(config, body.model, anthropic=True)
        turn = an.to_turn(body, config.thinking)
        prepared = await _preflight_chat(backend, turn)
        # message_start's cache count, asked before reserve(): no await may come between a place and its closer
        cached = await asyncio.to_thread(backend.cached_prefix, prepared) if body.stream else 0
        ticket = scheduler.reserve()
        run = lambda cancel: backend.chat(turn, prepared, cancel)
        if body.stream:
            stream = an.MessageStream(config.model_id, len(prepared.tokens), cached)
            return EventStream(_anthropic_events(ticket, run, stream, config), ticket)
        sink = an.MessageAggregate(config.model_id)
        await _collect(request, ticket, run, sink)
        return sink.response()

    @app.post("/v1/messages/count_tokens", tags=["anthropic"])
    async def count_tokens(body: an.CountTokensRequest):
        """The prompt's token count as this model's template and tokenizer see it."""
        _check_model(config, body.model, anthropic=True)
        turn = an.to_turn(body, config.thinking)
        prepared = await asyncio.to_thread(backend.prepare, turn)
        return {"input_tokens": len(prepared.tokens)}


# ---------------------------------------------------------------------------------------------
# OpenAI Responses
# ---------------------------------------------------------------------------------------------
def _responses_events(ticket: Ticket, run: Callable, stream: rs.ResponseStream,
                      config: ServerConfig) -> AsyncIterator[bytes]:
    def frames(events) -> bytes:
        return b"".join(rs.sse(name, data) for name, data in events)

    return _sse_stream(ticket, run, config, first=frames(stream.start()), frames=lambda item: frames(stream.feed(item)),
                       ping=b": ping\n\n",
                       on_error=lambda exc: frames(stream.fail(from_exception(exc).openai_body()["error"])))


def _responses_routes(app: FastAPI, backend: Backend, config: ServerConfig) -> None:
    scheduler: Scheduler = app.state.scheduler
    warned: set[tuple[str, ...]] = set()  # agents send the same hosted tools every turn: say it once

    @app.post("/responses", include_in_schema=False)
    @app.post("/v1/responses", tags=["openai"])
    async def responses(body: rq.ResponsesRequest, request: Request):
        """OpenAI Responses API (Codex CLI's `wire_api = "responses"`), streamed (SSE) or not; stateless."""
        _check_model(config, body.model)
        turn = rq.to_turn(body, config.thinking)
        if (ignored := tuple(rq.ignored_tools(body))) and ignored not in warned and len(warned) < 64:
            warned.add(ignored)
            log.warning("/v1/responses: ignoring non-function tools (hosted or custom): %s", ", ".join(ignored))
        prepared = await _preflight_chat(backend, turn, "max_output_tokens")
        ticket = scheduler.reserve()
        run = lambda cancel: backend.chat(turn, prepared, cancel)
        echo = rq.echo_of(body)
        if body.stream:
            return EventStream(_responses_events(ticket, run, rs.ResponseStream(config.model_id, echo), config),
                               ticket)
        sink = rs.ResponseAggregate(config.model_id, echo)
        await _collect(request, ticket, run, sink)
        return sink.response_json()


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def _model_card(config: ServerConfig, backend: Backend, anthropic: bool) -> dict:
    if anthropic:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(config.created))
        return {"id": config.model_id, "type": "model", "display_name": config.model_id, "created_at": created}
    return {"id": config.model_id, "object": "model", "created": config.created, "owned_by": "glmlocal",
            "context_length": backend.n_ctx, "max_model_len": backend.n_ctx}


def _info_routes(app: FastAPI, backend: Backend, config: ServerConfig) -> None:
    scheduler: Scheduler = app.state.scheduler

    @app.get("/health", tags=["info"])
    async def health():
        """Liveness plus queue state."""
        return {"status": "ok", "model": config.model_id, "n_ctx": backend.n_ctx, "busy": scheduler.busy,
                "running": scheduler.running, "parallel": scheduler.parallel, "queued": scheduler.waiting,
                "completed": scheduler.completed}

    @app.get("/", include_in_schema=False)
    async def root():
        return {"name": "glmlocal", "model": config.model_id, "docs": "/docs"}

    @app.get("/models", include_in_schema=False)
    @app.get("/v1/models", tags=["info"])
    async def models(request: Request):
        """The served model (OpenAI list shape; Anthropic's when an anthropic-version header is sent)."""
        anthropic = "anthropic-version" in request.headers
        card = _model_card(config, backend, anthropic)
        if anthropic:
            return {"data": [card], "has_more": False, "first_id": card["id"], "last_id": card["id"]}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", tags=["info"])
    async def model(model_id: str, request: Request):
        _check_model(config, model_id, anthropic=True)
        return _model_card(config, backend, "anthropic-version" in request.headers)
