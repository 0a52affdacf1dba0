"""Session: messages -> GLM template -> real llama.cpp on the tiny random fixture -> stream parser -> events.

The random model emits noise, so structure comes from grammars (forced tool calls, JSON output) and from
the prompt/caching machinery, which do not depend on what the model says."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from glmlocal.engine.engine import CacheConfig, Engine
from glmlocal.engine.generation import Sampling
from glmlocal.engine.session import Session, TurnResult
from glmlocal.errors import ContextOverflowError, InputError
from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.glm.template import ChatTemplate
from glmlocal.plan.planner import Placement

jsonschema = pytest.importorskip("jsonschema")

LIGHTS = {"type": "function", "function": {"name": "lights", "description": "Switch the lights", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["hall", "attic"]},
                                     "level": {"type": "integer"}},
    "required": ["on", "room"]}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
USER = [{"role": "system", "content": "You control a house."}, {"role": "user", "content": "Lights on in the hall."}]


@pytest.fixture(scope="module")
def engine(gguf_factory):
    placement = replace(Placement.cpu_only(ctx=2048, threads=2), n_batch=256, n_ubatch=256)
    with Engine.load(gguf_factory("tiny", "q4_k_m"), placement, cache=CacheConfig(min_tokens=16)) as eng:
        yield eng


@pytest.fixture(scope="module", params=["glm45", "glm47"])
def session(request, engine):
    fam = request.param
    return Session(engine, ChatTemplate.builtin(fam), fam, default_sampling=Sampling(seed=1), think_budget=24)


def run(session: Session, *args, **kw) -> tuple[list, TurnResult]:
    items = list(session.turn(*args, **kw))
    assert isinstance(items[-1], TurnResult) and not any(isinstance(i, TurnResult) for i in items[:-1])
    return items[:-1], items[-1]


@pytest.mark.parametrize("thinking", [False, True])
def test_forced_tool_call_is_valid_against_its_schema(session, thinking):
    choice = {"type": "function", "function": {"name": "lights"}}
    events, res = run(session, USER, [LIGHTS, WEATHER], tool_choice=choice, enable_thinking=thinking,
                      max_tokens=300)
    assert res.finish_reason == "tool_calls" and [c["name"] for c in res.tool_calls] == ["lights"]
    jsonschema.validate(res.tool_calls[0]["arguments"], LIGHTS["function"]["parameters"])
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    args = "".join(e.text for e in events if isinstance(e, ToolCallArgsDelta))
    assert len(starts) == 1 and json.loads(args) == res.tool_calls[0]["arguments"]
    assert isinstance(events[-1], Finish) and events[-1].reason == "tool_calls"
    end = next(e for e in events if isinstance(e, ToolCallEnd))
    assert res.tool_calls[0]["id"] == starts[0].id and end.name == "lights"
    msg = res.message()  # round-trips into the next prompt
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == res.tool_calls[0]["arguments"]


def test_required_tool_choice_picks_one_of_the_tools(session):
    _, res = run(session, USER, [LIGHTS, WEATHER], tool_choice="required", enable_thinking=False, max_tokens=300)
    assert res.finish_reason == "tool_calls" and res.tool_calls[0]["name"] in ("lights", "weather")


def test_json_schema_response_format(session):
    schema = {"type": "object", "properties": {"room": {"enum": ["hall", "attic"]}, "n": {"type": "integer"}},
              "required": ["room", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    _, res = run(session, USER, response_format=fmt, enable_thinking=False, max_tokens=200)
    jsonschema.validate(json.loads(res.content), schema)
    assert res.finish_reason == "stop"


def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_bans_calls(session):
    auto = session.prepare(USER, [LIGHTS], tool_choice="auto")
    none = session.prepare(USER, [LIGHTS], tool_choice="none")
    # the same prompt, token for token: a "none" turn reuses the KV cache of the turns around it
    assert "lights" in none.prompt and none.prompt == auto.prompt and none.tokens == auto.tokens
    assert none.tools is None and none.grammar is None and auto.grammar is None  # auto: no grammar
    call = session.engine.token_id("<tool_call>")
    assert call is not None and none.banned == (call,) and auto.banned == ()
    assert session.prepare(USER, None, tool_choice="none").banned == ()  # no tools: nothing to ban
    assert session.count_tokens(USER, [LIGHTS], tool_choice="none") == len(auto.tokens)


def test_tool_choice_none_never_starts_a_call(session):
    """A bias that makes `<tool_call>` the greedy choice at every step: "auto" starts a call at once,
    "none" never does (the ban wins over the client's bias) and the answer is plain content."""
    call = session.engine.token_id("<tool_call>")
    pushy = Sampling(temperature=0, seed=1, logit_bias={call: 100.0})
    _, auto = run(session, USER, [LIGHTS], tool_choice="auto", enable_thinking=False, sampling=pushy, max_tokens=6)
    assert "<tool_call>" in auto.raw_text
    events, none = run(session, USER, [LIGHTS], tool_choice="none", enable_thinking=False, sampling=pushy,
                       max_tokens=6)
    assert "<tool_call>" not in none.raw_text and not none.tool_calls and none.finish_reason != "tool_calls"
    assert not [e for e in events if isinstance(e, (ToolCallStart, ToolCallArgsDelta, ToolCallEnd))]
    assert none.completion_tokens > 0


def test_thinking_modes_shape_the_prompt(session):
    on, off = session.prepare(USER, enable_thinking=True), session.prepare(USER, enable_thinking=False)
    assert on.prompt.endswith(session.template.generation_prompt(True))
    assert off.prompt.endswith(session.template.generation_prompt(False))
    assert on.starts_in_thinking == (session.family == "glm47") and not off.starts_in_thinking


def test_bad_requests_fail_before_generation(session):
    with pytest.raises(InputError):
        session.turn(USER, None, tool_choice="required")
    with pytest.raises(InputError):
        session.turn(USER, response_format={"type": "xml"})
    huge = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(ContextOverflowError):
        session.turn(huge, max_tokens=10)


def test_follow_up_turn_reuses_the_cache(session):
    session.engine.reset()
    _, first = run(session, USER, enable_thinking=False, max_tokens=12)
    history = USER + [first.message(), {"role": "user", "content": "And the attic?"}]
    _, second = run(session, history, enable_thinking=False, max_tokens=4)
    assert first.cached_tokens == 0
    assert second.cached_tokens >= first.prompt_tokens  # only the reply's tail and the new message are evaluated
    assert second.prompt_tokens > second.cached_tokens


def test_cancel_and_early_close(session):
    cancel = threading.Event()
    no_eog = Sampling(seed=3, logit_bias={t: float("-inf") for t in session.engine.eog_ids})
    items = []
    for item in session.turn(USER, enable_thinking=False, sampling=no_eog, max_tokens=300, cancel=cancel):
        items.append(item)
        if isinstance(item, ContentDelta):
            cancel.set()
    assert items[-1].finish_reason == "cancelled" and items[-2] == Finish("cancelled")
    stream = session.turn(USER, enable_thinking=False, sampling=no_eog, max_tokens=300)
    next(stream)
    stream.close()  # releases the engine: the next turn runs
    _, res = run(session, USER, enable_thinking=False, max_tokens=2)
    assert res.completion_tokens <= 2 and res.ttft_s > 0


@pytest.mark.parametrize("choice,forced", [
    ({"type": "auto"}, False), ({"type": "none"}, False), ({"type": "any"}, True),
    ({"type": "tool", "name": "weather"}, True), ("required", True), (None, False),
])
def test_openai_and_anthropic_tool_choice_forms(session, choice, forced):
    prep = session.prepare(USER, [LIGHTS, WEATHER], tool_choice=choice, enable_thinking=False)
    assert (prep.grammar is not None) == forced
    if choice == {"type": "none"}:
        assert prep.tools is None and "weather" in prep.prompt and prep.banned
    if choice == {"type": "tool", "name": "weather"}:
        _, res = run(session, USER, [LIGHTS, WEATHER], tool_choice=choice, enable_thinking=False, max_tokens=100)
        assert [c["name"] for c in res.tool_calls] == ["weather"]


def test_stop_string_cuts_the_content_and_is_reported(session):
    greedy = Sampling(temperature=0, seed=1)
    _, full = run(session, USER, enable_thinking=False, sampling=greedy, max_tokens=40)
    text = full.content
    assert len(text) > 8, text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    events, cut = run(session, USER, enable_thinking=False, sampling=greedy, max_tokens=40, stop=[stop, "\x00never"])
    assert cut.content == text[:text.index(stop)] and cut.stop_sequence == stop and cut.finish_reason == "stop"
    assert events[-1] == Finish("stop") and "".join(e.text for e in events if isinstance(e, ContentDelta)) == cut.content
    assert 0 < cut.completion_tokens < full.completion_tokens and cut.tokens_per_s > 0
    assert full.stop_sequence is None
    _, again = run(session, USER, enable_thinking=False, max_tokens=2)  # the engine was released
    assert again.completion_tokens <= 2


def thinker(session, engine=None) -> Session:
    """A greedy session whose thinking budget closes the think block after 12 tokens: with a JSON answer forced,
    the random model really thinks, then answers (GLM-4.5/4.6 opens the block itself: a bias makes it)."""
    bias = {} if session.family == "glm47" else {session.engine.token_id("<think>"): 30.0}
    return Session(engine or session.engine, session.template, session.family,
                   default_sampling=Sampling(temperature=0, seed=4, logit_bias=bias), think_budget=12)


def test_stop_strings_do_not_apply_to_reasoning(session):
    """Stop strings end the answer (as Anthropic's stop_sequences): text inside the thinking block never stops it."""
    json_answer = {"response_format": {"type": "json_object"}, "max_tokens": 60}
    _, full = run(thinker(session), USER, **json_answer)
    assert full.reasoning and full.content.startswith("{")
    stop = next(s for s in (full.reasoning[i:i + 4] for i in range(len(full.reasoning) - 4))
                if s.strip() and s not in full.content)
    _, res = run(thinker(session), USER, stop=[stop], **json_answer)
    assert (res.reasoning, res.content, res.stop_sequence) == (full.reasoning, full.content, None)


class RecordingEngine:
    """The real engine, with every generated token recorded (to check the session's counts against)."""

    def __init__(self, engine):
        self.engine, self.tokens = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *args, **kwargs):
        for out in self.engine.generate(*args, **kwargs):
            if out.token is not None and not out.eog:
                self.tokens.append(out.token)
            yield out


def test_reasoning_tokens_are_the_tokens_generated_inside_the_think_block(session):
    """The budget closes the think block after a few tokens, so the random model really thinks, then answers;
    the count equals the tokens from `<think>` through `</think>`, and the budget, to the token."""
    rec = RecordingEngine(session.engine)
    stream = thinker(session, rec).turn(USER, response_format={"type": "json_object"}, max_tokens=80)
    live_at_content = None
    for item in stream:
        if isinstance(item, ContentDelta) and live_at_content is None:
            live_at_content = stream.reasoning_tokens
        res = item
    assert res.reasoning and res.content.startswith("{")
    # The grammar may spell a tag in several tokens: find the tokens whose text completes each tag.
    text, ends = "", []
    for tok in rec.tokens:
        text += session.engine.token_bytes(tok).decode("utf-8", "replace")
        ends.append(len(text))

    def token_completing(tag: str) -> int:
        at = text.index(tag) + len(tag)
        return next(i for i, end in enumerate(ends) if end >= at)

    start = 0 if session.family == "glm47" else token_completing("<think>")  # 4.7 prompts end inside <think>
    expected = token_completing("</think>") + 1 - start
    assert res.reasoning_tokens == expected == live_at_content == 12
    assert 0 < res.reasoning_tokens < res.completion_tokens


def test_parallel_tool_calls_off_ends_the_turn_after_the_first_call():
    """TurnStream on a scripted token stream (the random model cannot write two valid calls unforced) and the
    real parser: with one call allowed the turn ends, as "tool_calls", right after the first call's end."""
    from types import SimpleNamespace

    from glmlocal.engine.generation import GenerationStats, TokenOut
    from glmlocal.engine.session import TurnStream
    from glmlocal.glm.parser import StreamParser

    pieces = ["<tool_call>", "lights", "\n<arg_key>", "on", "</arg_key>", "\n<arg_value>", "true", "</arg_value>",
              "\n</tool_call>", "<tool_call>", "weather", "\n<arg_key>city</arg_key><arg_value>Rome</arg_value>",
              "</tool_call>"]
    stats = GenerationStats(prompt_tokens=10, completion_tokens=0)
    closed = []

    def tokens():
        try:
            for i, piece in enumerate(pieces):
                stats.completion_tokens += 1
                yield TokenOut(i, piece)
            stats.completion_tokens += 1
            yield TokenOut(99, "", "stop", stats, eog=True)
        finally:
            closed.append(True)

    engine = SimpleNamespace(last_stats=stats)
    for limit, names in ((None, ["lights", "weather"]), (1, ["lights"])):
        stats.completion_tokens, closed[:] = 0, []
        parser = StreamParser("glm45", [LIGHTS, WEATHER], starts_in_thinking=False)
        items = list(TurnStream(engine, tokens(), parser, (), max_calls=limit))
        res = items[-1]
        assert [c["name"] for c in res.tool_calls] == names and res.finish_reason == "tool_calls"
        assert items[-2] == Finish("tool_calls") and closed
        assert res.completion_tokens == (len(pieces) + 1 if limit is None else 9)
