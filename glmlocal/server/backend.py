"""The real backend: a Session (engine + GLM template + parser) behind the server's Backend protocol.

Everything here runs on the scheduler's generation thread except `count_tokens`/`count_text`, which only
render and tokenize (llama.cpp's vocabulary is read-only, so that is safe next to a running generation).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from glmlocal.generation import Sampling
from glmlocal.glm.events import ContentDelta, Finish
from glmlocal.server.types import CompletionRequest, TextDelta, TurnRequest, Usage
from glmlocal.session import TurnResult

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(Sampling)}


class StopScanner:
    """Finds the first stop string in streamed text, holding back only what could still start one.

    Stop sequences apply to the visible answer (content), not to reasoning or tool-call markup."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string hit or None)."""
        buf = self.pending + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, stop = min(hits)
            self.pending = ""
            return buf[:at], stop
        keep = max((n for s in self.stops for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class SessionBackend:
    """Serves chat turns through `session` and raw completions through its engine."""

    def __init__(self, session: Any):
        self.session, self.engine = session, session.engine
        self.n_ctx = int(self.engine.n_ctx)

    def _sampling(self, overrides: dict, stop: Sequence[str] = ()) -> Sampling:
        base = self.session.default_sampling
        changes = {k: v for k, v in overrides.items() if k in _SAMPLING_FIELDS}
        if "top_k" in changes and changes["top_k"] is not None and changes["top_k"] < 0:
            changes["top_k"] = 0  # OpenAI-style clients send -1 for "off"
        if stop:
            changes["stop"] = tuple(stop)
        return dataclasses.replace(base, **changes)

    def count_tokens(self, turn: TurnRequest) -> int:
        prep = self.session.prepare(turn.messages, turn.tools, tool_choice=turn.tool_choice,
                                    enable_thinking=turn.enable_thinking, clear_thinking=turn.clear_thinking,
                                    response_format=turn.response_format)
        return len(prep.tokens)

    def count_text(self, text: str) -> int:
        return len(self.engine.tokenize(text))

    def chat(self, turn: TurnRequest, cancel: threading.Event) -> Iterator[Any]:
        stream = self.session.turn(turn.messages, turn.tools, tool_choice=turn.tool_choice,
                                   enable_thinking=turn.enable_thinking, clear_thinking=turn.clear_thinking,
                                   response_format=turn.response_format, sampling=self._sampling(turn.sampling),
                                   max_tokens=turn.max_tokens, cancel=cancel)
        return self._drive(stream, StopScanner(turn.stop) if turn.stop else None)

    def _drive(self, stream: Iterator[Any], scanner: StopScanner | None) -> Iterator[Any]:
        try:
            for item in stream:
                if isinstance(item, TurnResult):
                    yield Usage(item.prompt_tokens, item.completion_tokens, item.cached_tokens)
                    return
                if scanner is None:
                    yield item
                    continue
                if isinstance(item, ContentDelta):
                    text, hit = scanner.push(item.text)
                    if text:
                        yield ContentDelta(text)
                    if hit is not None:
                        yield from self._stopped(hit)
                        return
                    continue
                if scanner.pending:  # a tool call or the end: the held-back text was not a stop string
                    yield ContentDelta(scanner.flush())
                yield item
        finally:
            stream.close()  # releases the engine lock when we stop early (stop string)

    def _stopped(self, stop: str) -> Iterator[Any]:
        stats = self.engine.last_stats
        yield Finish("stop")
        yield Usage(stats.prompt_tokens, stats.completion_tokens, stats.cached_tokens, stop_sequence=stop)

    def complete(self, req: CompletionRequest, cancel: threading.Event) -> Iterator[Any]:
        tokens = self.engine.tokenize(req.prompt)
        stream = self.engine.generate(tokens, self._sampling(req.sampling, req.stop), max_tokens=req.max_tokens,
                                      cancel=cancel)
        try:
            for out in stream:
                if out.text:
                    yield TextDelta(out.text)
                if out.finish_reason is not None:
                    st = out.stats
                    yield Finish(out.finish_reason)
                    yield Usage(st.prompt_tokens, st.completion_tokens, st.cached_tokens)
                    return
        finally:
            stream.close()
