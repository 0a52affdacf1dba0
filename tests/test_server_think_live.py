"""Thinking on a live `glmlocal serve` (subprocess, real engine, random fixture GGUFs that never close `</think>`
on their own) driven by the real openai and anthropic SDKs: forced calls arrive with thinking on (the default)
in Chat Completions, Responses and Messages, streamed or not, down to the documented minimum max_tokens, and
one token less is each API's 400; a budget of N gives N reasoning tokens and then an answer; reasoning comes as
both `reasoning_content` and `reasoning`; message_start reports the cached prompt tokens; Anthropic without
`thinking` renders the official template's thinking-off prompt, token for token."""

from __future__ import annotations

import json

import anthropic
import jinja2
import jsonschema
import openai
import pytest

from glmlocal.glm.shortest import forced_call_tokens
from glmlocal.glm.template import builtin_source
from quantize.gguf_reader import read_gguf
from tests.server_live import ServeProcess

# Equal-length enums, all required: every valid call is as long as the shortest (what the minimum holds).
SWITCH = {"type": "object", "properties": {"room": {"enum": ["hall", "yard"]}, "mode": {"enum": ["on", "up"]}},
          "required": ["room", "mode"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "enum": [1, 2, 3]}, "metric": {"type": "boolean"}},
           "required": ["city", "days", "metric"]}
OA_TOOLS = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in (("switch", SWITCH),
                                                                                     ("weather", WEATHER))]
RS_TOOLS = [{"type": "function", "name": n, "parameters": p} for n, p in (("switch", SWITCH), ("weather", WEATHER))]
AN_TOOLS = [{"name": n, "input_schema": p} for n, p in (("switch", SWITCH), ("weather", WEATHER))]
FAMILIES = ["glm45", "glm47"]


@pytest.fixture(scope="module", params=FAMILIES)
def server(request, gguf_factory):
    path = gguf_factory("tiny", "q4_k_m", family=request.param)
    proc = ServeProcess(path, "--ctx", "2048")
    proc.family, proc.path = request.param, path
    yield proc
    proc.stop()


def oa(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def an(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)


def minimum(srv, name: str) -> int:
    """The documented minimum max_tokens for a forced call with thinking on: the shortest call's worst case
    (glm/shortest.py), its end token, and the one token closing GLM-4.7's open think block."""
    choice = {"type": "function", "function": {"name": name}}
    return forced_call_tokens(OA_TOOLS, choice, srv.family, enable_thinking=True) + (srv.family == "glm47")


def _no_end(srv) -> dict[str, int]:
    tokens = read_gguf(srv.path).metadata["tokenizer.ggml.tokens"]
    return {str(tokens.index(t)): -100 for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}


# --------------------------------------------------------------------------------------- forced calls arrive
def _chat_call(srv, name: str, max_tokens: int, stream: bool, seed: int) -> tuple[str, dict, str, int]:
    kwargs = dict(model="model.gguf", messages=[{"role": "user", "content": "Go."}], tools=OA_TOOLS, max_tokens=max_tokens,
                  tool_choice={"type": "function", "function": {"name": name}}, seed=seed)
    if not stream:
        r = oa(srv).chat.completions.create(**kwargs)
        call = r.choices[0].message.tool_calls[0]
        return call.function.name, json.loads(call.function.arguments), r.choices[0].finish_reason, \
            r.usage.completion_tokens_details.reasoning_tokens
    name_seen, args, finish, usage = None, "", None, None
    for chunk in oa(srv).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                name_seen, args = tc.function.name or name_seen, args + (tc.function.arguments or "")
            finish = choice.finish_reason or finish
    return name_seen, json.loads(args), finish, usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_forced_call_with_thinking_on_at_the_minimum(server, stream):
    low = minimum(server, "switch")
    for seed in (1, 2):
        name, args, finish, reasoning = _chat_call(server, "switch", low, stream, seed)
        assert (name, finish) == ("switch", "tool_calls")
        jsonschema.validate(args, SWITCH)
        assert reasoning == (1 if server.family == "glm47" else 0)  # only the forced `</think>` fits
    with pytest.raises(openai.BadRequestError) as err:
        _chat_call(server, "switch", low - 1, stream, 1)
    assert err.value.body["param"] == "max_tokens" and f"at least {low}" in err.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_forced_call_with_thinking_on_and_room_to_think(server, stream):
    """The issue's request: a named function, enum schema, max_tokens 256, GLM's default thinking."""
    for seed in (3, 4):
        name, args, finish, reasoning = _chat_call(server, "weather", 256, stream, seed)
        assert (name, finish) == ("weather", "tool_calls")
        jsonschema.validate(args, WEATHER)
        if server.family == "glm47":  # the random model thinks until the reserve, then the call comes
            assert 256 - 2 * minimum(server, "weather") - 40 < reasoning < 256 - minimum(server, "weather")


@pytest.mark.parametrize("stream", [False, True])
def test_responses_forced_call_with_thinking_on(server, stream):
    low = minimum(server, "switch")
    kwargs = dict(model="model.gguf", input="Go.", tools=RS_TOOLS, tool_choice={"type": "function", "name": "switch"},
                  extra_body={"seed": 5})
    for max_output in (low, 200):
        if stream:
            with oa(server).responses.stream(max_output_tokens=max_output, **kwargs) as events:
                resp = events.get_final_response()
        else:
            resp = oa(server).responses.create(max_output_tokens=max_output, **kwargs)
        call = next(item for item in resp.output if item.type == "function_call")
        assert resp.status == "completed" and call.name == "switch"
        jsonschema.validate(json.loads(call.arguments), SWITCH)
        if server.family == "glm47" and max_output == 200:
            reasoning = next(item for item in resp.output if item.type == "reasoning")
            assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text
            assert resp.usage.output_tokens_details.reasoning_tokens > 100
    with pytest.raises(openai.BadRequestError) as err:
        oa(server).responses.create(max_output_tokens=low - 1, **kwargs)
    assert err.value.body["param"] == "max_output_tokens" and "max_output_tokens" in err.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_forced_tool_use_with_thinking_enabled(server, stream):
    low = minimum(server, "switch")
    for max_tokens, choice in ((low, {"type": "tool", "name": "switch"}), (low, {"type": "any"}), (300, {"type": "any"})):
        kwargs = dict(model="claude-sonnet-4-6", max_tokens=max_tokens, tools=AN_TOOLS[:1], tool_choice=choice,
                      thinking={"type": "enabled", "budget_tokens": max_tokens - 1},
                      messages=[{"role": "user", "content": "Go."}])
        if stream:
            with an(server).messages.stream(**kwargs) as events:
                msg = events.get_final_message()
        else:
            msg = an(server).messages.create(**kwargs)
        use = next(b for b in msg.content if b.type == "tool_use")
        assert msg.stop_reason == "tool_use" and use.name == "switch"
        jsonschema.validate(use.input, SWITCH)
        if server.family == "glm47" and max_tokens == 300:
            assert msg.content[0].type == "thinking" and msg.content[0].thinking
    with pytest.raises(anthropic.BadRequestError) as err:
        an(server).messages.create(**{**kwargs, "max_tokens": low - 1, "thinking": {"type": "enabled",
                                                                                    "budget_tokens": 4}})
    assert "max_tokens" in err.value.body["error"]["message"] and f"at least {low}" in err.value.body["error"]["message"]


# --------------------------------------------------------------------------------------------- budgets
def test_a_budget_of_n_gives_n_reasoning_tokens_then_an_answer_in_both_field_names(server):
    client, body = oa(server), {"chat_template_kwargs": {"thinking_budget": 16}}
    bias = _no_end(server)
    if server.family == "glm45":  # GLM-4.5/4.6 opens the block itself: make the random model do it
        tokens = read_gguf(server.path).metadata["tokenizer.ggml.tokens"]
        bias[str(tokens.index("<think>"))] = 40
    kwargs = dict(model="model.gguf", messages=[{"role": "user", "content": "Think."}], max_tokens=40, seed=3,
                  logit_bias=bias, extra_body=body)
    r = client.chat.completions.create(**kwargs)
    msg = r.choices[0].message
    assert r.usage.completion_tokens_details.reasoning_tokens == 16 and r.usage.completion_tokens == 40
    assert msg.content and msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [(d.model_extra.get("reasoning_content"), d.model_extra.get("reasoning")) for d in deltas]
    assert all(a == b for a, b in reasoning) and "".join(a or "" for a, _ in reasoning)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 16


def test_anthropic_budget_tokens_bound_the_thinking_block(server):
    if server.family == "glm45":
        pytest.skip("GLM-4.5/4.6 decides itself whether to open the block (the random fixture rarely does)")
    msg = an(server).messages.create(model="claude-sonnet-4-6", max_tokens=40, messages=[{"role": "user",
                                     "content": "Plan a trip."}], thinking={"type": "enabled", "budget_tokens": 12},
                                     extra_body={"temperature": 0})
    assert [b.type for b in msg.content][:2] == ["thinking", "text"] and msg.content[1].text
    cut = an(server).messages.create(model="claude-sonnet-4-6", max_tokens=40, messages=[{"role": "user",
                                     "content": "Plan a trip."}], thinking={"type": "enabled", "budget_tokens": 24},
                                     extra_body={"temperature": 0})
    assert len(cut.content[0].thinking) > len(msg.content[0].thinking)  # a larger budget thinks longer


# ------------------------------------------------------------------------------ Anthropic: the prompt, cache
def _official(family: str, messages: list[dict], enable_thinking: bool) -> str:
    """The official template rendered by plain Jinja (as transformers renders chat templates)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
    return env.from_string(builtin_source(family)).render(messages=messages, add_generation_prompt=True,
                                                          enable_thinking=enable_thinking)


def test_anthropic_without_thinking_is_the_official_thinking_off_prompt(server):
    """Live: the count and the usage are the official thinking-off prompt's; token for token it is checked on
    the same stack in-process below."""
    import llama_cpp

    llm = llama_cpp.Llama(str(server.path), vocab_only=True, verbose=False)
    messages = [{"role": "user", "content": "Plan a trip."}]
    off = llm.tokenize(_official(server.family, messages, False).encode(), add_bos=False, special=True)
    on = llm.tokenize(_official(server.family, messages, True).encode(), add_bos=False, special=True)
    count = an(server).messages.count_tokens(model="claude-sonnet-4-6", messages=messages)
    assert count.input_tokens == len(off) and off != on
    msg = an(server).messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=messages)
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == len(off)
    assert all(b.type != "thinking" for b in msg.content)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prompt_anthropic_generates_from_is_the_official_one_token_for_token(gguf_factory, family):
    """The real app, backend, session and engine in-process, the tokens handed to the engine recorded: without
    `thinking`, the official template's enable_thinking=False prompt; with it, the enable_thinking=True one."""
    from glmlocal.engine.engine import Engine
    from glmlocal.engine.session import Session
    from glmlocal.glm.template import ChatTemplate
    from glmlocal.plan.placement import Placement
    from glmlocal.server.backend import SessionBackend
    from tests.test_server_app import an_client, serve

    system, messages = "Be brief.", [{"role": "user", "content": "Plan a trip."}]
    with Engine.load(gguf_factory("tiny", "q4_k_m", family=family), Placement.cpu_only(ctx=1024, threads=2)) as eng:
        seen, generate = [], eng.generate
        eng.generate = lambda tokens, *a, **kw: (seen.append(list(tokens)), generate(tokens, *a, **kw))[1]
        with serve(SessionBackend(Session(eng, ChatTemplate.builtin(family), family))) as srv:
            client = an_client(srv)
            client.messages.create(model="claude-sonnet-4-6", max_tokens=2, system=system, messages=messages)
            client.messages.create(model="claude-sonnet-4-6", max_tokens=4, system=system, messages=messages,
                                   thinking={"type": "enabled", "budget_tokens": 2})
        full = [{"role": "system", "content": system}, *messages]
        assert seen == [eng.tokenize(_official(family, full, False)), eng.tokenize(_official(family, full, True))]


def test_message_start_reports_the_cached_prompt_tokens(server):
    kwargs = dict(model="claude-sonnet-4-6", max_tokens=4, extra_body={"temperature": 0},
                  system="You are a patient travel agent. " * 20, messages=[{"role": "user", "content": "Lisbon?"}])
    an(server).messages.create(**kwargs)
    with an(server).messages.stream(**kwargs) as events:
        start = next(ev for ev in events if ev.type == "message_start")
        final = events.get_final_message()
    known = start.message.usage
    assert known.cache_read_input_tokens > 100 and known.cache_read_input_tokens == final.usage.cache_read_input_tokens
    assert known.input_tokens + known.cache_read_input_tokens == final.usage.input_tokens + \
        final.usage.cache_read_input_tokens
