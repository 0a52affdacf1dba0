"""Session: messages -> GLM template -> real llama.cpp on the tiny random fixture -> stream parser -> events.

The random model emits noise, so structure comes from grammars (forced tool calls, JSON output) and from
the prompt/caching machinery, which do not depend on what the model says."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from glmlocal.engine import CacheConfig, Engine
from glmlocal.errors import ContextOverflowError, InputError
from glmlocal.generation import Sampling
from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.glm.template import ChatTemplate
from glmlocal.planner import Placement
from glmlocal.session import Session, TurnResult

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


def test_tool_choice_none_keeps_tools_out_of_the_prompt(session):
    with_tools = session.prepare(USER, [LIGHTS], tool_choice="auto")
    without = session.prepare(USER, [LIGHTS], tool_choice="none")
    assert "lights" in with_tools.prompt and "lights" not in without.prompt
    assert without.tools is None and without.grammar is None and with_tools.grammar is None  # auto: no grammar
    assert session.count_tokens(USER, [LIGHTS]) == len(with_tools.tokens)


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
        assert prep.tools is None and "weather" not in prep.prompt
    if choice == {"type": "tool", "name": "weather"}:
        _, res = run(session, USER, [LIGHTS, WEATHER], tool_choice=choice, enable_thinking=False, max_tokens=100)
        assert [c["name"] for c in res.tool_calls] == ["weather"]
