"""Internal, API-neutral shapes the two adapters translate to and from.

`TurnRequest` is what the OpenAI and Anthropic adapters produce from a request body; `Usage` is what the
backend reports after a turn. Messages are OpenAI-shaped dicts because that is what GLM's chat templates
read: role, content (str), reasoning_content, tool_calls [{id, type, function: {name, arguments: dict}}],
tool_call_id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glmlocal.glm.events import Event, Finish
from glmlocal.glm.tools import ToolChoice


@dataclass
class TurnRequest:
    """One chat turn to run, independent of the wire API it came from."""

    messages: list[dict]
    tools: list[dict] | None = None  # OpenAI function-tool dicts
    tool_choice: ToolChoice = "auto"  # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}
    enable_thinking: bool = True
    think_budget: int | None = None  # most tokens to think (None: unbounded); see server/thinking.py
    clear_thinking: bool | None = None
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    sampling: dict = field(default_factory=dict)  # temperature, top_p, top_k, min_p, seed, penalties
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    parallel_tool_calls: bool = True  # False: end the turn after its first tool call


@dataclass
class CompletionRequest:
    """A raw text completion (POST /v1/completions): no chat template."""

    prompt: str
    sampling: dict = field(default_factory=dict)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)


@dataclass
class TextDelta:
    """A piece of raw completion text (the /v1/completions stream)."""

    text: str


@dataclass
class Usage:
    """Token accounting for one request; `cached_tokens` were reused from the KV cache, not recomputed."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_sequence: str | None = None  # which stop string ended the turn, if any
    reasoning_tokens: int = 0  # completion tokens spent inside thinking blocks
    prompt_s: float = 0.0  # prompt processing (to the first token)
    decode_s: float = 0.0  # first token to last
    draft_n: int = 0  # speculative tokens drafted and verified
    draft_n_accepted: int = 0  # of which the model agreed with

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def decode_per_s(self) -> float:
        """Tokens per second after the first: decode_s spans the n - 1 steps from the first token to the last
        (the first one's time is the prompt's), as the engine's GenerationStats.tokens_per_s counts it."""
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s > 0 else 0.0


ChatItem = Event | Usage  # what a backend's chat() yields: glm events, then one Usage
CompletionItem = TextDelta | Finish | Usage  # what its complete() yields
