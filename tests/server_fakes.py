"""A scripted stand-in for the engine, for unit tests of the server's translation, queueing and cancellation.

It yields the same event types as the real Session (glm/events.py) and one final Usage. The real engine is
exercised by tests/test_server_live.py; this fake never replaces it there.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from glmlocal.engine.session import PreparedTurn
from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.server.types import CompletionRequest, TextDelta, TurnRequest, Usage


@dataclass
class FakeBackend:
    """Answers every chat turn with a little thinking and a fixed text, or a tool call when one is forced.

    `delay` seconds pass between events (so tests can disconnect mid-stream); `started`/`cancelled` count
    jobs, `prepared` counts prepare() calls (one per chat request), and `seen` keeps every TurnRequest."""

    n_ctx: int = 4096
    delay: float = 0.0
    tokens: int = 8
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    prepared: int = 0
    seen: list = field(default_factory=list)
    running: threading.Event = field(default_factory=threading.Event)

    def prepare(self, turn: TurnRequest) -> PreparedTurn:
        self.prepared += 1
        text = json.dumps(turn.messages) + json.dumps(turn.tools or [])
        return PreparedTurn(text, list(range(max(1, len(text) // 4))), None, turn.tools, False)

    def tokenize(self, text: str) -> list[int]:
        return list(range(max(1, len(text) // 4)))

    def cached_prefix(self, prepared: PreparedTurn) -> int:
        return len(prepared.tokens) // 2  # what a real engine would report before generating: here, half

    def _tool_events(self, turn: TurnRequest):
        choice = turn.tool_choice
        name = choice["function"]["name"] if isinstance(choice, dict) else turn.tools[0]["function"]["name"]
        args = {"city": "Paris", "days": 3}
        text = json.dumps(args)
        return [ToolCallStart(0, "call_fake0", name), ToolCallArgsDelta(0, text[:9]),
                ToolCallArgsDelta(0, text[9:]), ToolCallEnd(0, name, args, "call_fake0"), Finish("tool_calls")]

    def _script(self, turn: TurnRequest):
        if turn.tools and turn.tool_choice not in ("auto", "none"):
            return self._tool_events(turn)
        words = [f"w{i} " for i in range(self.tokens)]
        events = [ReasoningDelta("Let me think.")] if turn.enable_thinking else []
        events += [ContentDelta(w) for w in words]
        limit = turn.max_tokens or self.n_ctx
        if limit < len(events):
            return events[:limit] + [Finish("length")]
        return events + [Finish("stop")]

    def _play(self, events, prompt_tokens: int, cancel: threading.Event):
        self.started += 1
        self.running.set()
        try:
            n = 0
            for ev in events:
                if cancel.is_set():
                    self.cancelled += 1
                    yield Finish("cancelled")
                    yield Usage(prompt_tokens, n, 0)
                    return
                if self.delay:
                    time.sleep(self.delay)
                n += not isinstance(ev, Finish)
                yield ev
            yield Usage(prompt_tokens, n, prompt_tokens // 2)
            self.finished += 1
        finally:
            self.running.clear()

    def chat(self, turn: TurnRequest, prepared: PreparedTurn, cancel: threading.Event):
        self.seen.append(turn)
        return self._play(self._script(turn), len(prepared.tokens), cancel)

    def complete(self, req: CompletionRequest, tokens: list[int], cancel: threading.Event):
        events = [TextDelta(f" t{i}") for i in range(min(req.max_tokens, self.tokens))]
        reason = "length" if req.max_tokens <= self.tokens else "stop"
        return self._play(events + [Finish(reason)], len(tokens), cancel)


class ThreadServer:
    """uvicorn serving an ASGI app on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
