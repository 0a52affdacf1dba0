"""Each API's thinking semantics (server/thinking.py): pure tables, then through the app with the real openai and
anthropic SDKs (a scripted backend): budgets from every source, the server's --thinking / --think-budget, and
bad budgets as each API's 400 with the parameter named. The real engine is in tests/test_server_think_live.py."""

from __future__ import annotations

import anthropic
import openai
import pytest

from glmlocal.errors import InputError
from glmlocal.server import anthropic as an
from glmlocal.server import openai as oa
from glmlocal.server import responses_request as rq
from glmlocal.server.errors import APIError
from glmlocal.server.thinking import EFFORT_BUDGETS, ThinkingPolicy
from tests.server_fakes import FakeBackend
from tests.test_server_app import an_client, oa_client, serve

HI = [{"role": "user", "content": "hi"}]
ON, OFF = ThinkingPolicy("on"), ThinkingPolicy("off")


def oa_turn(policy=ThinkingPolicy(), **body):
    return oa.to_turn(oa.ChatCompletionRequest(messages=HI, **body), policy)


def an_turn(policy=ThinkingPolicy(), **body):
    body.setdefault("max_tokens", 4096)
    return an.to_turn(an.MessagesRequest(messages=HI, **body), policy)


def rq_turn(policy=ThinkingPolicy(), **body):
    return rq.to_turn(rq.ResponsesRequest(input="hi", **body), policy)


@pytest.mark.parametrize("body,thinks,budget", [
    ({}, True, None),  # GLM's default, as vLLM and SGLang serve it
    ({"reasoning_effort": "none"}, False, None), ({"reasoning_effort": "minimal"}, False, None),
    ({"reasoning_effort": "low"}, True, 1024), ({"reasoning_effort": "medium"}, True, 4096),
    ({"reasoning_effort": "high"}, True, 16384), ({"reasoning_effort": "xhigh"}, True, None),
    ({"chat_template_kwargs": {"thinking_budget": 77}}, True, 77),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"thinking_budget": 50}}, True, 50),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, False, None),
    ({"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, True, None),
    ({"thinking": {"type": "disabled"}}, False, None), ({"thinking": {"type": "enabled"}}, True, None),
])
def test_openai_chat_completions(body, thinks, budget):
    turn = oa_turn(**body)
    assert (turn.enable_thinking, turn.think_budget) == (thinks, budget)


@pytest.mark.parametrize("effort,thinks,budget", [(None, True, None), ("minimal", False, None), ("low", True, 1024),
                                                  ("medium", True, 4096), ("high", True, 16384)])
def test_openai_responses(effort, thinks, budget):
    turn = rq_turn(reasoning={"effort": effort, "summary": "auto"})
    assert (turn.enable_thinking, turn.think_budget) == (thinks, budget)
    assert rq_turn(chat_template_kwargs={"thinking_budget": 9}).think_budget == 9


@pytest.mark.parametrize("thinking,thinks,budget", [
    (None, False, None),  # Anthropic: no `thinking` field, no thinking
    ({"type": "enabled", "budget_tokens": 2048}, True, 2048),
    ({"type": "enabled", "budget_tokens": 16}, True, 16),  # below Anthropic's 1024: fine locally
    ({"type": "adaptive"}, True, None), ({"type": "disabled"}, False, None),
])
def test_anthropic_messages(thinking, thinks, budget):
    turn = an_turn(**({"thinking": thinking} if thinking else {}))
    assert (turn.enable_thinking, turn.think_budget) == (thinks, budget)


def test_the_server_policy_overrides_or_fills_in():
    assert (an_turn(ON).enable_thinking, oa_turn(OFF, reasoning_effort="high").enable_thinking) == (True, False)
    assert an_turn(OFF, thinking={"type": "enabled", "budget_tokens": 64}).enable_thinking is False
    default = ThinkingPolicy(budget=300)
    assert oa_turn(default).think_budget == 300 and oa_turn(default, reasoning_effort="low").think_budget == 1024
    assert an_turn(default).think_budget is None  # not thinking: no budget
    assert an_turn(default, thinking={"type": "adaptive"}).think_budget == 300
    assert EFFORT_BUDGETS == {"low": 1024, "medium": 4096, "high": 16384, "xhigh": None}
    for bad in ({"mode": "sometimes"}, {"budget": 0}):
        with pytest.raises(InputError, match="--thinking|--think-budget"):
            ThinkingPolicy(**bad)


@pytest.mark.parametrize("thinking,max_tokens,param", [
    ({"type": "enabled", "budget_tokens": 4096}, 4096, "max_tokens"),  # Anthropic's rule: budget < max_tokens
    ({"type": "enabled", "budget_tokens": 5000}, 4096, "max_tokens"),
    ({"type": "enabled", "budget_tokens": 0}, 4096, "thinking.budget_tokens"),
    ({"type": "enabled", "budget_tokens": -5}, 4096, "thinking.budget_tokens"),
    ({"type": "enabled"}, 4096, "thinking.budget_tokens"),
])
def test_anthropic_bad_budgets(thinking, max_tokens, param):
    with pytest.raises(APIError) as err:
        an_turn(thinking=thinking, max_tokens=max_tokens)
    assert err.value.status == 400 and err.value.param == param and param in err.value.message


@pytest.mark.parametrize("value", [0, -1, 2.5, "64", True])
def test_openai_bad_thinking_budgets(value):
    for make in (oa_turn, rq_turn):
        with pytest.raises(APIError) as err:
            make(chat_template_kwargs={"thinking_budget": value})
        assert err.value.param == "chat_template_kwargs.thinking_budget"


# ------------------------------------------------------------------------------- through the app, real SDKs
@pytest.fixture(scope="module")
def live():
    backend = FakeBackend()
    with serve(backend, thinking=ThinkingPolicy(budget=500)) as srv:
        srv.backend = backend
        yield srv


def test_each_api_reaches_the_backend_with_its_semantics(live):
    seen = live.backend.seen
    oa_client(live).chat.completions.create(model="glm-4.6", messages=HI, reasoning_effort="medium")
    an_client(live).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=HI)
    an_client(live).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=HI,
                                    thinking={"type": "enabled", "budget_tokens": 32})
    oa_client(live).responses.create(model="glm-4.6", input="hi")
    assert [(t.enable_thinking, t.think_budget) for t in seen[-4:]] == [(True, 4096), (False, None), (True, 32),
                                                                        (True, 500)]


def test_bad_budgets_are_each_apis_400_naming_the_parameter(live):
    with pytest.raises(anthropic.BadRequestError) as err:
        an_client(live).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=HI,
                                        thinking={"type": "enabled", "budget_tokens": 64})
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens must be greater than thinking.budget_tokens" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        an_client(live).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=HI,
                                        thinking={"type": "enabled", "budget_tokens": 2.5})
    assert "thinking.budget_tokens" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        an_client(live).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=HI,
                                        thinking={"type": "enabled", "budget_tokens": -3})
    assert "thinking.budget_tokens must be a whole number" in err.value.body["error"]["message"]
    for extra in ({"chat_template_kwargs": {"thinking_budget": -1}}, {"chat_template_kwargs": {"thinking_budget": 1.5}}):
        with pytest.raises(openai.BadRequestError) as err:
            oa_client(live).chat.completions.create(model="glm-4.6", messages=HI, extra_body=extra)
        assert err.value.body["param"] == "chat_template_kwargs.thinking_budget"
        with pytest.raises(openai.BadRequestError) as err:
            oa_client(live).responses.create(model="glm-4.6", input="hi", extra_body=extra)
        assert err.value.body["param"] == "chat_template_kwargs.thinking_budget"
    with pytest.raises(openai.BadRequestError) as err:
        oa_client(live).chat.completions.create(model="glm-4.6", messages=HI, reasoning_effort="extreme")
    assert "reasoning_effort" in err.value.body["message"]
