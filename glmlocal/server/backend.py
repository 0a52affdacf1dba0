"""The real backend: a Session (engine + GLM template + parser) behind the server's Backend protocol.

Everything here runs on the scheduler's generation thread except `prepare`/`tokenize`, which only render
and tokenize (llama.cpp's vocabulary is read-only, so that is safe next to a running generation). `chat`
generates from the PreparedTurn `prepare` made, `complete` from the tokens `tokenize` made: a request is
rendered and tokenized once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence

from glmlocal.engine.generation import Sampling
from glmlocal.engine.session import PreparedTurn, Session, TurnResult, TurnStream
from glmlocal.glm.events import Finish
from glmlocal.server.types import (
    ChatItem,
    CompletionItem,
    CompletionRequest,
    TextDelta,
    TurnRequest,
    Usage,
)

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(Sampling)}


class SessionBackend:
    """Serves chat turns through `session` and raw completions through its engine."""

    def __init__(self, session: Session):
        self.session, self.engine = session, session.engine
        self.n_ctx = int(self.engine.n_ctx)

    def _sampling(self, overrides: Mapping[str, object], stop: Sequence[str] = ()) -> Sampling:
        base = self.session.default_sampling
        changes = {k: v for k, v in overrides.items() if k in _SAMPLING_FIELDS}
        if "top_k" in changes and changes["top_k"] is not None and changes["top_k"] < 0:
            changes["top_k"] = 0  # OpenAI-style clients send -1 for "off"
        if stop:
            changes["stop"] = tuple(stop)
        return dataclasses.replace(base, **changes)

    def prepare(self, turn: TurnRequest) -> PreparedTurn:
        return self.session.prepare(turn.messages, turn.tools, tool_choice=turn.tool_choice,
                                    enable_thinking=turn.enable_thinking, clear_thinking=turn.clear_thinking,
                                    response_format=turn.response_format)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def cached_prefix(self, prepared: PreparedTurn) -> int:
        """Prompt tokens the KV cache holds for this turn now (the engine looks, runs nothing)."""
        return self.engine.cached_prefix(prepared.tokens)

    def chat(self, turn: TurnRequest, prepared: PreparedTurn, cancel: threading.Event) -> Iterator[ChatItem]:
        stream = self.session.run(prepared, sampling=self._sampling(turn.sampling), max_tokens=turn.max_tokens,
                                  cancel=cancel, stop=turn.stop, parallel_tool_calls=turn.parallel_tool_calls,
                                  think_budget=turn.think_budget)
        return self._drive(stream)

    def _drive(self, stream: TurnStream) -> Iterator[ChatItem]:
        try:
            for item in stream:
                if isinstance(item, TurnResult):
                    yield Usage(item.prompt_tokens, item.completion_tokens, item.cached_tokens,
                                stop_sequence=item.stop_sequence, reasoning_tokens=item.reasoning_tokens,
                                prompt_s=item.prompt_s, decode_s=item.decode_s, draft_n=item.draft_n,
                                draft_n_accepted=item.draft_n_accepted)
                    return
                yield item
        finally:
            stream.close()  # a client gone mid-turn: the engine ends its sequence and frees the slot

    def complete(self, req: CompletionRequest, tokens: list[int],
                 cancel: threading.Event) -> Iterator[CompletionItem]:
        stream = self.engine.generate(tokens, self._sampling(req.sampling, req.stop), max_tokens=req.max_tokens,
                                      cancel=cancel)
        try:
            for out in stream:
                if out.text:
                    yield TextDelta(out.text)
                if out.finish_reason is not None:
                    st = out.stats
                    yield Finish(out.finish_reason)
                    yield Usage(st.prompt_tokens, st.completion_tokens, st.cached_tokens, prompt_s=st.prompt_s,
                                decode_s=st.decode_s, draft_n=st.draft_n, draft_n_accepted=st.draft_n_accepted)
                    return
        finally:
            stream.close()
