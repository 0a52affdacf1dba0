"""One assistant turn: chat messages -> GLM prompt -> tokens -> engine -> stream parser -> events.

The single place that turns a chat request into events, shared by `glmlocal chat` and `glmlocal serve`:

    session = Session(engine, ChatTemplate.for_model(meta, family), family)
    for item in session.turn(messages, tools, tool_choice="auto", max_tokens=512, cancel=event):
        if isinstance(item, TurnResult): usage = item          # always last
        else: handle(item)                                     # glmlocal.glm.events.*

`turn()` is `prepare()` (render, tokenize, pick the grammar: a `PreparedTurn`) then `run()` (generate). A
caller that needs the prompt before generating (the server sizes a request before queueing it) calls the two
itself, so a request is rendered and tokenized once. Both validate everything (template, tools, grammar,
context size) before they return, so errors (InputError, TemplateError, ContextOverflowError, EngineError)
surface before the first event. The returned `TurnStream` holds a sequence in the engine's decode loop (a
slot of its KV pool) while it runs: exhaust it or call `.close()` on it, which frees the slot at the next step.

Stop strings end the visible answer: they are matched in the content only, never in reasoning or tool-call
markup (as Anthropic's stop_sequences), and `TurnResult.stop_sequence` says which one ended the turn.
tool_choice "none" keeps the tools in the prompt (so the prompt, and its KV cache, match the turns that do
allow calls, as vLLM renders it) and bans the `<tool_call>` token, so the answer is always plain content.

Thinking: a turn rendered with thinking off bans `<think>` (off means off, whatever a small model would do). A
thinking budget (tokens, the tags included) is enforced by the engine (engine/budget.py), and
`TurnResult.reasoning_tokens` sums the engine's per-token flags. A forced tool call or JSON answer caps thinking
so that the output has room within max_tokens: `think_limit` reserves the worst-case tokens of the shortest
valid output (glm/shortest.py) plus FORCED_MARGIN, and refuses (ThinkRoomError, param max_tokens) a forced call
that cannot fit even without thinking.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from glmlocal.engine.budget import ThinkBudget, char_openers
from glmlocal.engine.generation import (
    GenerationStats,
    Sampling,
    StopMatcher,
    TokenEngine,
    TokenOut,
)
from glmlocal.errors import InputError
from glmlocal.glm.events import (
    ContentDelta,
    Event,
    Finish,
    ReasoningDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.glm.parser import CALL_OPEN, THINK_CLOSE, THINK_OPEN, StreamParser
from glmlocal.glm.shortest import forced_call_tokens, forced_json_tokens
from glmlocal.glm.template import ChatTemplate
from glmlocal.glm.tools import ToolChoice, json_schema_grammar, tool_call_grammar

Messages = Sequence[Mapping[str, object]]  # OpenAI chat messages (glmlocal.glm.template normalises them)
Tools = list[Mapping[str, object]]  # OpenAI function tools
# Tokens kept free beyond the shortest forced output: argument values longer than the shortest, the optional
# space after JSON values, optional arguments. Small next to any real max_tokens, and it only shortens thinking.
FORCED_MARGIN = 32


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
    tool_calls: list[dict[str, object]] = field(default_factory=list)  # {"id", "name", "arguments": dict}; ended calls
    raw_text: str = ""  # what the model wrote, markup included
    reasoning_tokens: int = 0  # generated tokens inside thinking blocks (the tags opening/closing them included)
    stop_sequence: str | None = None  # the stop string that ended the answer (finish_reason is then "stop")
    decode_s: float = 0.0  # from the first generated token to the last
    draft_n: int = 0  # speculative tokens drafted and verified (engine/spec.py)
    draft_n_accepted: int = 0  # of which the model agreed with

    def message(self) -> dict[str, object]:
        """The assistant message in OpenAI chat format, ready to append to the history."""
        msg: dict[str, object] = {"role": "assistant", "content": self.content}
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
    """A rendered, tokenized request: what `run()` generates from (its token count sizes the request)."""

    prompt: str
    tokens: list[int]
    grammar: str | None
    tools: Tools | None  # the tools the parser recognises (None for tool_choice "none")
    starts_in_thinking: bool
    banned: tuple[int, ...] = ()  # tokens never sampled (tool_choice "none": `<tool_call>`; thinking off: `<think>`)
    thinking: bool = True  # rendered with thinking on
    forced_room: int | None = None  # tokens a forced call / JSON answer needs after thinking (None: nothing forced)
    forced_call: bool = False  # forced_room is a tool call's: without room for it the request is refused


class ThinkRoomError(InputError):
    """max_tokens cannot hold the forced tool call even with no thinking (`param`: the request field to name)."""

    param = "max_tokens"


def think_limit(prep: PreparedTurn, requested: int | None, max_tokens: int) -> int | None:
    """The thinking budget a turn runs with: `requested` (None: unbounded), capped when the output is forced so
    that it keeps `forced_room + FORCED_MARGIN` tokens of max_tokens (thinking shrinks down to nothing first:
    a GLM-4.7 prompt opened the block, so closing it takes one token). Raises InputError for a budget below 1
    and ThinkRoomError when max_tokens cannot hold even the shortest forced call."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise InputError(f"a thinking budget must be a whole number of tokens, at least 1; got {requested!r}")
    if prep.forced_room is None:
        return requested
    need = prep.forced_room + (1 if prep.starts_in_thinking else 0)
    if prep.forced_call and max_tokens < need:
        raise _no_room(need, max_tokens)
    if not prep.thinking:
        return requested
    cap = max(max_tokens - prep.forced_room - FORCED_MARGIN, 1)
    return cap if requested is None else min(requested, cap)


def _no_room(need: int, max_tokens: int) -> ThinkRoomError:
    return ThinkRoomError(f"max_tokens {max_tokens} cannot hold the forced tool call: its shortest valid form "
                          f"needs up to {need} tokens (the end token, and closing an open think block, included)",
                          hint=f"raise max_tokens to at least {need}")


def _response_schema(response_format: Mapping[str, object] | None) -> tuple[bool, Mapping[str, object] | None]:
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


def _normalize_tool_choice(choice: ToolChoice) -> ToolChoice:
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

    def __init__(self, engine: TokenEngine, template: ChatTemplate, family: str, *,
                 default_sampling: Sampling | None = None, think_budget: int | None = None):
        self.engine, self.template, self.family = engine, template, family
        self.default_sampling = default_sampling or Sampling()
        self.think_budget = think_budget  # tokens a turn may think when the call names none (None: unbounded)
        # `<think>`, `</think>`, `<tool_call>` as single tokens (None where the vocabulary lacks one)
        self._tags = tuple(engine.token_id(t) for t in (THINK_OPEN, THINK_CLOSE, CALL_OPEN))
        self._openers: tuple[int, ...] | None = None  # engine/budget.py char_openers, computed on first use

    def prepare(self, messages: Messages, tools: Tools | None = None, *, tool_choice: ToolChoice = "auto",
                enable_thinking: bool = True, clear_thinking: bool | None = None,
                response_format: Mapping[str, object] | None = None) -> PreparedTurn:
        """Render and tokenize a request and pick its grammar (no generation)."""
        tools = list(tools) if tools else None
        tool_choice = _normalize_tool_choice(tool_choice)
        # Tools stay in the prompt for "none" too: the system turn (what agents' KV caches reuse) is unchanged.
        prompt = self.template.render(messages, tools, add_generation_prompt=True,
                                      enable_thinking=enable_thinking, clear_thinking=clear_thinking)
        grammar = tool_call_grammar(tools, self.family, tool_choice, enable_thinking=enable_thinking) if tools else None
        if grammar is None and tool_choice not in (None, "auto", "none") and not tools:
            raise InputError(f"tool_choice {tool_choice!r} needs tools")
        room = forced_call_tokens(tools, tool_choice, self.family, enable_thinking=enable_thinking) if grammar else None
        forced_call = room is not None
        constrain, schema = _response_schema(response_format)
        if grammar is None and constrain:
            grammar = json_schema_grammar(schema, family=self.family, enable_thinking=enable_thinking)
            room = forced_json_tokens(schema, self.family, enable_thinking=enable_thinking)
        no_calls = tool_choice == "none" and tools is not None
        think_open, _, call_token = self._tags
        banned = [call_token] if no_calls else []
        banned += [] if enable_thinking else [think_open]
        return PreparedTurn(prompt, self.engine.tokenize(prompt), grammar, None if no_calls else tools,
                            self.template.starts_in_thinking(enable_thinking),
                            banned=tuple(t for t in banned if t is not None), thinking=enable_thinking,
                            forced_room=room, forced_call=forced_call)

    def count_tokens(self, messages: Messages, tools: Tools | None = None, *, enable_thinking: bool = True,
                     tool_choice: ToolChoice = "auto") -> int:
        """Prompt tokens a request would use (for Anthropic's count_tokens and context checks)."""
        return len(self.prepare(messages, tools, tool_choice=tool_choice, enable_thinking=enable_thinking).tokens)

    def turn(self, messages: Messages, tools: Tools | None = None, *, tool_choice: ToolChoice = "auto",
             enable_thinking: bool = True, clear_thinking: bool | None = None,
             response_format: Mapping[str, object] | None = None, sampling: Sampling | None = None,
             max_tokens: int | None = None, cancel: threading.Event | None = None,
             stop: Sequence[str] = (), parallel_tool_calls: bool = True,
             think_budget: int | None = None) -> TurnStream:
        """Run one assistant turn: `prepare()` then `run()` (see the module docstring)."""
        prep = self.prepare(messages, tools, tool_choice=tool_choice, enable_thinking=enable_thinking,
                            clear_thinking=clear_thinking, response_format=response_format)
        return self.run(prep, sampling=sampling, max_tokens=max_tokens, cancel=cancel, stop=stop,
                        parallel_tool_calls=parallel_tool_calls, think_budget=think_budget)

    def run(self, prep: PreparedTurn, *, sampling: Sampling | None = None, max_tokens: int | None = None,
            cancel: threading.Event | None = None, stop: Sequence[str] = (),
            parallel_tool_calls: bool = True, think_budget: int | None = None) -> TurnStream:
        """Generate the answer to a prepared request; yields glm events, then one TurnResult.

        `stop` (and `sampling.stop`) are stop strings for the answer's content. `parallel_tool_calls=False`
        ends the turn after its first tool call (OpenAI's parallel_tool_calls, Anthropic's
        disable_parallel_tool_use). `think_budget` (tokens; None: the session's) bounds thinking, see
        `think_limit` (which raises here, before anything is generated, when a forced call cannot fit)."""
        sampling = sampling or self.default_sampling
        stops = (*stop, *sampling.stop)
        bias = {**sampling.logit_bias, **{t: float("-inf") for t in prep.banned}}
        limit = max_tokens if max_tokens is not None else self.engine.n_ctx - len(prep.tokens)
        think = self.think_budget_for(prep, think_budget, limit)
        stream = self.engine.generate(prep.tokens, replace(sampling, stop=(), logit_bias=bias),
                                      grammar=prep.grammar, max_tokens=max_tokens, cancel=cancel, think=think)
        parser = StreamParser(self.family, prep.tools, starts_in_thinking=prep.starts_in_thinking)
        return TurnStream(self.engine, stream, parser, stops, max_calls=None if parallel_tool_calls else 1,
                          flags=think is not None)

    def think_budget_for(self, prep: PreparedTurn, requested: int | None, max_tokens: int) -> ThinkBudget | None:
        """What the engine enforces for this turn (None when the vocabulary lacks single-token think tags: then
        the parser counts). Raises as `think_limit` does."""
        budget = think_limit(prep, self.think_budget if requested is None else requested, max_tokens)
        think_open, think_close, call = self._tags
        if think_open is None or think_close is None:
            return None
        budget = budget if prep.thinking else None
        if budget is not None and self._openers is None:
            self._openers = char_openers(self.engine.n_vocab, self.engine.token_bytes)
        return ThinkBudget(think_open, think_close, budget, prep.starts_in_thinking, call,
                           self._openers if budget is not None else ())


class TurnStream:
    """The iterator `Session.turn` returns: glm events, then one TurnResult.

    While it runs, `completion_tokens` and `reasoning_tokens` count the tokens generated so far (the chat's
    "Thought for N tokens" reads the latter when the thinking block closes; with `flags`, they are the engine's
    own per-token marks, exact by construction). `close()` stops the generation and releases the engine."""

    def __init__(self, engine: TokenEngine, stream: Generator[TokenOut, None, None], parser: StreamParser,
                 stops: Sequence[str], *, max_calls: int | None = None, flags: bool = False):
        self._engine, self._stream, self._parser, self._max_calls = engine, stream, parser, max_calls
        self._flags = flags  # the engine marks thinking tokens (TokenOut.thinking); else the parser's state counts
        self._stops = StopMatcher(stops)
        self._agg = _Aggregate()
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self._t_first: float | None = None
        self._gen = self._run()

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> Event | TurnResult:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _run(self) -> Iterator[Event | TurnResult]:
        try:
            for out in self._stream:
                events = self._feed(out)
                for ev in events:
                    yield from self._emit(ev)
                    reason = self._cut_reason(ev)
                    if reason is not None:
                        yield from self._emit(Finish(reason))
                        yield self._stopped()
                        return
                if out.finish_reason is not None:
                    yield self._agg.result(out.stats, self.reasoning_tokens)
                    return
        finally:
            self._stream.close()

    def _feed(self, out: TokenOut) -> list[Event]:
        """Parse one step; a token counts as thinking when the parser is in a thinking block before or after it."""
        was_reasoning = self._parser.in_reasoning
        self._agg.raw.append(out.text)
        events = self._parser.feed(out.text)
        if out.token is not None:
            self.completion_tokens += 1
            self._t_first = self._t_first or time.perf_counter()
            if self._flags:
                self.reasoning_tokens += out.thinking
            elif not out.eog:
                self.reasoning_tokens += was_reasoning or self._parser.in_reasoning
        if out.finish_reason is not None:
            events += self._parser.finish(out.finish_reason)
        return events

    def _emit(self, ev: Event) -> Iterator[Event]:
        """Events out, with stop strings matched in the content (held-back text is released before anything else)."""
        if isinstance(ev, ContentDelta) and self._stops.stops:
            text, _ = self._stops.push(ev.text)
            out = [ContentDelta(text)] if text else []
        else:
            held = self._stops.flush()
            out = [ContentDelta(held), ev] if held else [ev]
        for item in out:
            self._agg.add(item)
            yield item

    def _cut_reason(self, ev: Event) -> str | None:
        """Why the turn ends right after `ev` although the model has not stopped (None: it goes on)."""
        if self._stops.matched is not None:
            return "stop"
        if isinstance(ev, ToolCallEnd) and self._max_calls is not None and len(self._agg.calls) >= self._max_calls:
            return "tool_calls"
        return None

    def _stopped(self) -> TurnResult:
        """The result of a turn ended early (stop string, tool-call limit): the engine stream is closed
        before its end, so its stats are finished here."""
        self._stream.close()
        stats = self._engine.last_stats or GenerationStats()
        if self._t_first is not None and not stats.decode_s:
            stats.decode_s = time.perf_counter() - self._t_first
        return self._agg.result(stats, self.reasoning_tokens, stop_sequence=self._stops.matched)


class _Aggregate:
    """Collects a turn's events into the final TurnResult."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict[str, object]] = []
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

    def result(self, st: GenerationStats, reasoning_tokens: int, stop_sequence: str | None = None) -> TurnResult:
        return TurnResult(
            finish_reason=self.finish, prompt_tokens=st.prompt_tokens, cached_tokens=st.cached_tokens,
            completion_tokens=st.completion_tokens, ttft_s=st.ttft_s, tokens_per_s=st.tokens_per_s,
            prompt_s=st.prompt_s, reasoning="".join(self.reasoning), content="".join(self.content),
            tool_calls=self.calls, raw_text="".join(self.raw), reasoning_tokens=reasoning_tokens,
            stop_sequence=stop_sequence, decode_s=st.decode_s, draft_n=st.draft_n,
            draft_n_accepted=st.draft_n_accepted)
