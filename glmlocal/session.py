"""One assistant turn: chat messages -> GLM prompt -> tokens -> engine -> stream parser -> events.

The single place that turns a chat request into events, shared by `glmlocal chat` and `glmlocal serve`:

    session = Session(engine, ChatTemplate.for_model(meta, family), family)
    for item in session.turn(messages, tools, tool_choice="auto", max_tokens=512, cancel=event):
        if isinstance(item, TurnResult): usage = item          # always last
        else: handle(item)                                     # glmlocal.glm.events.*

`turn()` validates everything (template, tools, grammar, context size) before it returns, so errors
(InputError, TemplateError, ContextOverflowError, EngineError) surface before the first event. The
returned iterator holds the engine lock while it runs: exhaust it or call `.close()` on it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmlocal.errors import InputError
from glmlocal.generation import Sampling, TokenOut
from glmlocal.glm.events import (
    ContentDelta,
    Event,
    Finish,
    ReasoningDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.glm.parser import StreamParser
from glmlocal.glm.tools import json_schema_grammar, tool_call_grammar


@dataclass
class TurnResult:
    """The end of a turn: finish reason, usage and the aggregated assistant message."""

    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    prompt_s: float = 0.0
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments": dict}; completed calls only
    raw_text: str = ""  # what the model wrote, markup included

    def message(self) -> dict:
        """The assistant message in OpenAI chat format, ready to append to the history."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"],
                                                                                          ensure_ascii=False)}}
                                 for c in self.tool_calls]
        return msg


@dataclass(frozen=True)
class PreparedTurn:
    """A rendered, tokenized request: what `turn()` will run (exposed for count_tokens and debugging)."""

    prompt: str
    tokens: list[int]
    grammar: str | None
    tools: list[Mapping[str, Any]] | None  # the tools the parser recognises (None for tool_choice "none")
    starts_in_thinking: bool


def _response_schema(response_format: Mapping[str, Any] | None) -> tuple[bool, Mapping[str, Any] | None]:
    """(constrain?, schema) for an OpenAI response_format."""
    if not response_format:
        return False, None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return True, schema if isinstance(schema, Mapping) else None
    raise InputError(f"unsupported response_format type {kind!r}", hint="use text, json_object or json_schema")


def _normalize_tool_choice(choice: Any) -> Any:
    """OpenAI or Anthropic tool_choice -> "auto" | "none" | "required" | {"type": "function", ...}."""
    if not isinstance(choice, Mapping):
        return choice or "auto"
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):  # Anthropic's named tool
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


class Session:
    """Binds an Engine to a GLM chat template and family ("glm45" or "glm47")."""

    def __init__(self, engine: Any, template: Any, family: str, *, default_sampling: Sampling | None = None,
                 think_budget: int | None = None):
        self.engine, self.template, self.family = engine, template, family
        self.default_sampling = default_sampling or Sampling()
        self.think_budget = think_budget  # caps forced-output thinking (chars) so a grammar cannot think forever

    def prepare(self, messages: Sequence[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None, *,
                tool_choice: Any = "auto", enable_thinking: bool = True, clear_thinking: bool | None = None,
                response_format: Mapping[str, Any] | None = None) -> PreparedTurn:
        """Render and tokenize a request and pick its grammar (no generation)."""
        tools = list(tools) if tools else None
        tool_choice = _normalize_tool_choice(tool_choice)
        if tool_choice == "none":
            tools = None
        prompt = self.template.render(messages, tools, add_generation_prompt=True,
                                      enable_thinking=enable_thinking, clear_thinking=clear_thinking)
        grammar = tool_call_grammar(tools, self.family, tool_choice, enable_thinking=enable_thinking,
                                    think_budget=self.think_budget) if tools else None
        if grammar is None and tool_choice not in (None, "auto", "none") and not tools:
            raise InputError(f"tool_choice {tool_choice!r} needs tools")
        constrain, schema = _response_schema(response_format)
        if grammar is None and constrain:
            grammar = json_schema_grammar(schema, family=self.family, enable_thinking=enable_thinking,
                                          think_budget=self.think_budget)
        return PreparedTurn(prompt, self.engine.tokenize(prompt), grammar, tools,
                            self.template.starts_in_thinking(enable_thinking))

    def count_tokens(self, messages: Sequence[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None,
                     *, enable_thinking: bool = True, tool_choice: Any = "auto") -> int:
        """Prompt tokens a request would use (for Anthropic's count_tokens and context checks)."""
        return len(self.prepare(messages, tools, tool_choice=tool_choice, enable_thinking=enable_thinking).tokens)

    def turn(self, messages: Sequence[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None, *,
             tool_choice: Any = "auto", enable_thinking: bool = True, clear_thinking: bool | None = None,
             response_format: Mapping[str, Any] | None = None, sampling: Sampling | None = None,
             max_tokens: int | None = None, cancel: threading.Event | None = None) -> Iterator[Event | TurnResult]:
        """Run one assistant turn; yields glm events, then one TurnResult (see the module docstring)."""
        prep = self.prepare(messages, tools, tool_choice=tool_choice, enable_thinking=enable_thinking,
                            clear_thinking=clear_thinking, response_format=response_format)
        stream = self.engine.generate(prep.tokens, sampling or self.default_sampling, grammar=prep.grammar,
                                      max_tokens=max_tokens, cancel=cancel)
        parser = StreamParser(self.family, prep.tools, starts_in_thinking=prep.starts_in_thinking)
        return self._events(stream, parser)

    def _events(self, stream: Iterator[TokenOut], parser: StreamParser) -> Iterator[Event | TurnResult]:
        agg = _Aggregate()
        try:
            for out in stream:
                agg.raw.append(out.text)
                for ev in parser.feed(out.text):
                    agg.add(ev)
                    yield ev
                if out.finish_reason is not None:
                    for ev in parser.finish(out.finish_reason):
                        agg.add(ev)
                        yield ev
                    yield agg.result(out)
                    return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


class _Aggregate:
    """Collects a turn's events into the final TurnResult."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.ids: dict[int, str] = {}
        self.finish = "stop"

    def add(self, ev: Event) -> None:
        if isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            self.content.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            self.ids[ev.index] = ev.id
        elif isinstance(ev, ToolCallEnd):
            self.calls.append({"id": ev.id or self.ids.get(ev.index, ""), "name": ev.name,
                               "arguments": dict(ev.arguments)})
        elif isinstance(ev, Finish):
            self.finish = ev.reason

    def result(self, last: TokenOut) -> TurnResult:
        st = last.stats
        return TurnResult(
            finish_reason=self.finish, prompt_tokens=st.prompt_tokens, cached_tokens=st.cached_tokens,
            completion_tokens=st.completion_tokens, ttft_s=st.ttft_s, tokens_per_s=st.tokens_per_s,
            prompt_s=st.prompt_s, reasoning="".join(self.reasoning), content="".join(self.content),
            tool_calls=self.calls, raw_text="".join(self.raw))
