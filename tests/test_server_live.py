"""`glmlocal serve` as a subprocess on 127.0.0.1 with the real engine and fixture GGUFs, driven by the real
openai and anthropic SDKs: streamed and not, forced tool calls, tool results, thinking, prompt-cache reuse,
count_tokens, auth, schemathesis, and a bounded load test with disconnecting clients."""

from __future__ import annotations

import asyncio
import json
import random
import time

import anthropic
import httpx
import jsonschema
import openai
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.server_live import ServeProcess

KEY = "test-key-123"
# Enumerated values: the fixture model is random, so a free-form string argument would run to max_tokens.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                           "days": {"type": "integer", "enum": [1, 2, 3]}, "metric": {"type": "boolean"}},
          "required": ["city", "days", "metric"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Forecast", "parameters": SCHEMA}}]
AN_TOOLS = [{"name": "weather", "description": "Forecast", "input_schema": SCHEMA}]
GREEDY = {"temperature": 0, "seed": 1}
# The fixture model is random: with thinking on it may think until max_tokens before a forced call.
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(gguf_factory):
    proc = ServeProcess(gguf_factory("tiny", "q4_k_m"), "--ctx", "4096", "--max-queue", "8", api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server47(gguf_factory):
    proc = ServeProcess(gguf_factory("tiny", "q4_k_m", family="glm47"), "--ctx", "2048")
    yield proc
    proc.stop()


def oa(srv, key=KEY):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)


def an(srv, key=KEY):
    return anthropic.Anthropic(base_url=srv.url, api_key=key or "none", max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


def test_openai_streamed_equals_plain(server):
    client = oa(server)
    plain = client.chat.completions.create(model="model.gguf", messages=user("Hello there"), max_tokens=24, **GREEDY)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="model", messages=user("Hello there"), max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == (plain.choices[0].message.content or "")
    assert reasoning == (getattr(plain.choices[0].message, "reasoning_content", None) or "")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_openai_forced_tool_call_matches_schema(server, stream):
    kwargs = dict(model="model.gguf", messages=user("Weather in Paris for 3 days?"), tools=TOOLS, max_tokens=200,
                  tool_choice={"type": "function", "function": {"name": "weather"}}, extra_body=NO_THINK, **GREEDY)
    if not stream:
        r = oa(server).chat.completions.create(**kwargs)
        call, finish = r.choices[0].message.tool_calls[0], r.choices[0].finish_reason
        name, args, cid = call.function.name, call.function.arguments, call.id
    else:
        name, args, cid, finish = None, "", None, None
        for chunk in oa(server).chat.completions.create(stream=True, **kwargs):
            for tc in chunk.choices[0].delta.tool_calls or []:
                name, cid = tc.function.name or name, tc.id or cid
                args += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and name == "weather" and cid
    jsonschema.validate(json.loads(args), SCHEMA)


def test_openai_tool_result_round_trip_reuses_cache(server):
    client = oa(server)
    first = client.chat.completions.create(model="model.gguf", messages=user("Forecast for Rome?"), tools=TOOLS,
                                           tool_choice="required", max_tokens=200, extra_body=NO_THINK, **GREEDY)
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    history = user("Forecast for Rome?") + [
        {"role": "assistant", "content": msg.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny", "high": 24}'}]
    second = client.chat.completions.create(model="model.gguf", messages=history, tools=TOOLS, max_tokens=16, **GREEDY)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_multi_turn_cache_reuse_and_count_tokens(server):
    client = an(server)
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.40.e4f; cc_entrypoint=cli; cch=1a2b3;"},
              {"type": "text", "text": "You are a careful assistant. " * 20, "cache_control": {"type": "ephemeral"}}]
    history = user("Plan a trip to Lisbon.")
    t1 = client.messages.create(model="claude-sonnet-4-6", max_tokens=16, system=system, messages=history,
                                extra_body={"temperature": 0}, metadata={"user_id": "u1"})
    history = history + [{"role": "assistant", "content": t1.content or "ok"}] + user("And Porto?")
    system[0]["text"] = system[0]["text"].replace("1a2b3", "9z8y7")  # Claude Code changes cch every request
    count = client.messages.count_tokens(model="claude-sonnet-4-6", system=system, messages=history)
    t2 = client.messages.create(model="claude-sonnet-4-6", max_tokens=16, system=system, messages=history,
                                extra_body={"temperature": 0}, extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
                                extra_query={"beta": "true"})
    total2 = t2.usage.input_tokens + t2.usage.cache_read_input_tokens
    assert count.input_tokens == total2
    assert t2.usage.cache_read_input_tokens > 0.5 * total2  # everything before the new turn was reused


def test_anthropic_streamed_and_forced_tool_use(server):
    client = an(server)
    with client.messages.stream(model="model.gguf", max_tokens=200, tools=AN_TOOLS, extra_body={"temperature": 0},
                                tool_choice={"type": "tool", "name": "weather"}, thinking={"type": "disabled"},
                                messages=user("Weather in Oslo, 2 days")) as stream:
        kinds = [ev.type for ev in stream]
        msg = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert msg.stop_reason == "tool_use" and use.name == "weather"
    jsonschema.validate(use.input, SCHEMA)
    history = user("Weather in Oslo, 2 days") + [{"role": "assistant", "content": msg.content},
                                                 {"role": "user", "content": [
                                                     {"type": "tool_result", "tool_use_id": use.id,
                                                      "content": [{"type": "text", "text": "rain"}]}]}]
    reply = client.messages.create(model="model.gguf", max_tokens=12, tools=AN_TOOLS, messages=history)
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert reply.usage.cache_read_input_tokens > 0


def test_thinking_on_and_off(server47):
    client = oa(server47, key=None)
    on = client.chat.completions.create(model="model.gguf", messages=user("Think first"), max_tokens=20, **GREEDY)
    assert on.choices[0].message.reasoning_content  # GLM-4.7 starts inside <think>
    off = client.chat.completions.create(model="model.gguf", messages=user("Think first"), max_tokens=20,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **GREEDY)
    assert not getattr(off.choices[0].message, "reasoning_content", None) and off.choices[0].message.content
    amsg = an(server47, key=None).messages.create(model="model.gguf", max_tokens=20, messages=user("Think"),
                                                  thinking={"type": "enabled", "budget_tokens": 1024})
    assert amsg.content[0].type == "thinking" and amsg.content[0].signature
    amsg = an(server47, key=None).messages.create(model="model.gguf", max_tokens=20, messages=user("Think"),
                                                  thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in amsg.content)


def test_stop_sequences_cut_the_answer(server):
    kwargs = dict(model="model.gguf", messages=user("Count please"), max_tokens=40, extra_body=NO_THINK, **GREEDY)
    full = oa(server).chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = oa(server).chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]
    msg = an(server).messages.create(model="model.gguf", max_tokens=40, messages=user("Count please"),
                                     stop_sequences=[stop], thinking={"type": "disabled"},
                                     extra_body={"temperature": 0, "seed": 1})
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == full[:full.index(stop)]


def test_auth_failures_and_errors(server):
    with pytest.raises(openai.AuthenticationError):
        oa(server, key="wrong").chat.completions.create(model="model.gguf", messages=user("x"), max_tokens=2)
    with pytest.raises(anthropic.AuthenticationError):
        an(server, key="wrong").messages.create(model="model.gguf", max_tokens=2, messages=user("x"))
    with pytest.raises(openai.NotFoundError):
        oa(server).chat.completions.create(model="gpt-4o", messages=user("x"), max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oa(server).chat.completions.create(model="model.gguf", messages=user("word " * 5000), max_tokens=2)
    assert "4096" in e.value.message and e.value.code == "context_length_exceeded"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def live_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})


lazy_schema = schemathesis.pytest.from_fixture("live_schema")


@pytest.mark.slow
@lazy_schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_no_5xx_live(case, server):
    if isinstance(case.body, dict):  # keep each generation short; every other field stays fuzzed
        case.body["max_tokens"], case.body["max_completion_tokens"] = 4, None
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


async def _client(url: str, i: int, rng: random.Random) -> str:
    body = {"model": "model.gguf", "messages": user(f"client {i}: tell me a story"), "stream": True,
            "max_tokens": 40, "temperature": 0.7}
    headers = {"Authorization": f"Bearer {KEY}"}
    disconnect_after = rng.choice([None, None, 1, 5])
    async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as c:
        async with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                return "429"
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if disconnect_after is not None and n >= disconnect_after:
                        return "disconnected"
                    if line == "data: [DONE]":
                        return "done"
    return "truncated"


def _round(url: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[_client(url, i, rng) for i in range(n)]), 300)

    return asyncio.run(main())


@pytest.mark.slow
def test_load_32_streaming_clients_some_disconnecting(server):
    proc = psutil.Process(server.pid)
    first = _round(server.url, 32, seed=1)  # warm-up: allocations, caches, thread pools
    rss_warm = proc.memory_info().rss
    results = []
    for seed in (2, 3):
        results += _round(server.url, 32, seed=seed)
    rss_after = proc.memory_info().rss
    all_results = first + results
    assert set(all_results) <= {"done", "429", "disconnected"}, all_results
    assert all_results.count("done") >= 8 and all_results.count("429") >= 1 and "disconnected" in all_results
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0
    time.sleep(1)
    assert not httpx.get(server.url + "/health").json()["busy"]
    growth = (rss_after - rss_warm) / 2**20
    print(f"RSS after warm-up {rss_warm / 2**20:.1f} MiB, after 64 more requests {rss_after / 2**20:.1f} MiB "
          f"(+{growth:.1f} MiB); results { {k: all_results.count(k) for k in set(all_results)} }")
    assert growth < 30
    r = oa(server).chat.completions.create(model="model.gguf", messages=user("still there?"), max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
