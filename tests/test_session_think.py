"""Thinking budgets in a Session: the budget a turn runs with (`think_limit`, a table), and on real llama.cpp with
the random tiny fixture, a model that never closes `</think>` on its own: a budget of N gives exactly N reasoning
tokens and then an answer, a forced call arrives with thinking on down to the documented minimum max_tokens, and
thinking off means no thinking at all."""

from __future__ import annotations

import jsonschema
import pytest

from glmlocal.engine.engine import Engine
from glmlocal.engine.generation import Sampling
from glmlocal.engine.session import (
    FORCED_MARGIN,
    PreparedTurn,
    Session,
    ThinkRoomError,
    TurnResult,
    think_limit,
)
from glmlocal.errors import InputError
from glmlocal.glm.events import ContentDelta, ReasoningDelta
from glmlocal.glm.shortest import forced_call_tokens
from glmlocal.glm.template import ChatTemplate
from glmlocal.plan.planner import Placement

# Equal-length enums, all required: every valid call is as long as the shortest, so it fits at the minimum.
SWITCH = {"type": "function", "function": {"name": "switch", "parameters": {"type": "object", "properties": {
    "room": {"enum": ["hall", "yard"]}, "mode": {"type": "string", "enum": ["on", "up"]}},
    "required": ["room", "mode"]}}}
LIGHTS = {"type": "function", "function": {"name": "lights", "parameters": {"type": "object", "properties": {
    "on": {"type": "boolean"}, "room": {"enum": ["hall", "attic"]}, "level": {"type": "integer"}},
    "required": ["on", "room"]}}}
USER = [{"role": "user", "content": "Switch it."}]


def _prep(room: int | None, *, call: bool = True, inside: bool = False, thinking: bool = True) -> PreparedTurn:
    return PreparedTurn("", [1], "root ::= x", None, inside, thinking=thinking, forced_room=room, forced_call=call)


@pytest.mark.parametrize("prep,requested,max_tokens,budget", [
    (_prep(None), None, 100, None),  # nothing forced: the request's budget, unbounded by default
    (_prep(None), 7, 100, 7),
    (_prep(20), None, 1000, 1000 - 20 - FORCED_MARGIN),  # forced: thinking leaves the call its room
    (_prep(20), 50, 1000, 50),
    (_prep(20), 5000, 1000, 1000 - 20 - FORCED_MARGIN),
    (_prep(20), None, 30, 1),  # between the minimum and the margin: thinking shrinks to nothing first
    (_prep(20, inside=True), None, 21, 1),  # GLM-4.7: closing the open block is the one token left
    (_prep(20), None, 20, 1),  # GLM-4.5/4.6: a budget of 1 bans `<think>`: the call alone
    (_prep(20, call=False), None, 3, 1),  # a forced JSON answer is never refused, only capped
    (_prep(20, thinking=False), 9, 20, 9),
])
def test_the_budget_a_turn_runs_with(prep, requested, max_tokens, budget):
    assert think_limit(prep, requested, max_tokens) == budget


@pytest.mark.parametrize("prep,max_tokens,need", [(_prep(20), 19, 20), (_prep(20, inside=True), 20, 21),
                                                  (_prep(20, thinking=False), 19, 20)])
def test_a_forced_call_that_cannot_fit_is_refused_naming_max_tokens(prep, max_tokens, need):
    with pytest.raises(ThinkRoomError, match=f"max_tokens {max_tokens} cannot hold the forced tool call") as err:
        think_limit(prep, None, max_tokens)
    assert err.value.param == "max_tokens" and f"at least {need}" in err.value.one_line()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True])
def test_a_budget_must_be_a_positive_whole_number(bad):
    with pytest.raises(InputError, match="whole number of tokens"):
        think_limit(_prep(None), bad, 100)


# ------------------------------------------------------------------------------------------ real llama.cpp
@pytest.fixture(scope="module")
def engine(gguf_factory):
    with Engine.load(gguf_factory("tiny", "q4_k_m"), Placement.cpu_only(ctx=2048, threads=2)) as eng:
        yield eng


@pytest.fixture(scope="module", params=["glm45", "glm47"])
def session(request, engine):
    return Session(engine, ChatTemplate.builtin(request.param), request.param)


def _never_stops(session: Session, seed: int, *, think: float = 0.0) -> Sampling:
    """Random sampling without end-of-generation; `think` biases `<think>` (GLM-4.5/4.6 opens the block itself:
    the bias makes the random model do it, so every run thinks)."""
    bias = {t: float("-inf") for t in session.engine.eog_ids}
    if think:
        bias[session.engine.token_id("<think>")] = think
    return Sampling(seed=seed, logit_bias=bias)


def _run(session: Session, *args, **kw) -> tuple[list, TurnResult]:
    items = list(session.turn(*args, **kw))
    return items[:-1], items[-1]


@pytest.mark.parametrize("budget", [1, 5, 64])
def test_a_budget_of_n_gives_n_reasoning_tokens_then_an_answer(session, budget):
    sampling = _never_stops(session, budget, think=0.0 if session.family == "glm47" else 40.0)
    events, res = _run(session, USER, sampling=sampling, max_tokens=budget + 20, think_budget=budget)
    opens_itself = session.family == "glm45"
    expected = 0 if opens_itself and budget == 1 else budget  # a block that cannot close in 1 token never opens
    assert res.reasoning_tokens == expected and res.completion_tokens == budget + 20
    # one block, closed by the engine, then an answer (the bias may nest `<think>`s inside GLM-4.5's block: the
    # parser drops stray tags; after the block the spent budget bans a new one)
    assert res.raw_text.count("</think>") == (expected > 0) and "<think>" not in res.raw_text.split("</think>")[-1]
    assert res.content and any(isinstance(e, ContentDelta) for e in events)
    if session.family == "glm47" and budget > 2:
        assert res.reasoning and any(isinstance(e, ReasoningDelta) for e in events)


def test_the_session_default_budget_applies_when_the_turn_names_none(session):
    capped = Session(session.engine, session.template, session.family, think_budget=9)
    sampling = _never_stops(session, 3, think=0.0 if session.family == "glm47" else 40.0)
    _, res = _run(capped, USER, sampling=sampling, max_tokens=30)
    assert res.reasoning_tokens == 9
    _, res = _run(capped, USER, sampling=sampling, max_tokens=30, think_budget=4)
    assert res.reasoning_tokens == 4


def test_thinking_off_means_no_thinking_even_when_the_model_wants_it(session):
    _, res = _run(session, USER, enable_thinking=False, sampling=_never_stops(session, 2, think=100.0), max_tokens=12)
    assert res.reasoning_tokens == 0 and not res.reasoning and "<think>" not in res.raw_text


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_forced_call_arrives_at_the_minimum_max_tokens(session, seed):
    prep = session.prepare(USER, [SWITCH], tool_choice="required")
    minimum = prep.forced_room + (1 if prep.starts_in_thinking else 0)
    with pytest.raises(ThinkRoomError):
        session.run(prep, max_tokens=minimum - 1)  # refused before anything is generated
    sampling = _never_stops(session, seed, think=40.0)
    sampling = Sampling(seed=seed, logit_bias={k: v for k, v in sampling.logit_bias.items() if v > 0})
    events, res = _run(session, USER, [SWITCH], tool_choice="required", sampling=sampling, max_tokens=minimum)
    assert res.finish_reason == "tool_calls" and [c["name"] for c in res.tool_calls] == ["switch"], res.raw_text
    jsonschema.validate(res.tool_calls[0]["arguments"], SWITCH["function"]["parameters"])
    assert res.completion_tokens <= minimum


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_forced_call_arrives_with_thinking_on_and_the_room_reserved(session, seed):
    """The never-closing model thinks until the reserve, then the grammar writes the call (richer schema: an
    optional argument and a JSON boolean, so the call may be longer than the shortest)."""
    named = {"type": "function", "function": {"name": "lights"}}
    room = forced_call_tokens([LIGHTS], named, session.family, enable_thinking=True)
    max_tokens = room + FORCED_MARGIN + 40
    sampling = Sampling(seed=seed, logit_bias={session.engine.token_id("<think>"): 40.0})
    events, res = _run(session, USER, [LIGHTS], tool_choice=named, sampling=sampling, max_tokens=max_tokens)
    assert res.finish_reason == "tool_calls" and [c["name"] for c in res.tool_calls] == ["lights"], res.raw_text
    jsonschema.validate(res.tool_calls[0]["arguments"], LIGHTS["function"]["parameters"])
    assert 0 < res.reasoning_tokens <= 40  # thinking got what the reserve left
