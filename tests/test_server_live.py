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

from quantize.gguf_reader import read_gguf
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
    assert 0 < on.usage.completion_tokens_details.reasoning_tokens <= on.usage.completion_tokens
    off = client.chat.completions.create(model="model.gguf", messages=user("Think first"), max_tokens=20,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **GREEDY)
    assert not getattr(off.choices[0].message, "reasoning_content", None) and off.choices[0].message.content
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    amsg = an(server47, key=None).messages.create(model="model.gguf", max_tokens=20, messages=user("Think"),
                                                  thinking={"type": "enabled", "budget_tokens": 12})
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


def test_tool_choice_none_keeps_the_prompt_cache_and_never_calls(server, gguf_factory):
    """tool_choice "none" renders the same prompt as "auto" (tools included), so it reuses the KV cache, and
    no tool call can come out: even a logit_bias that makes `<tool_call>` the greedy pick every step."""
    call = read_gguf(gguf_factory("tiny", "q4_k_m")).metadata["tokenizer.ggml.tokens"].index("<tool_call>")
    pushy = {**NO_THINK, "logit_bias": {str(call): 100}}
    client = oa(server)
    history = [{"role": "system", "content": "You forecast the weather. " * 12}] + user("Weather in Paris?")
    auto = client.chat.completions.create(model="model.gguf", messages=history, tools=TOOLS, max_tokens=4,
                                          extra_body=NO_THINK, **GREEDY)
    follow_up = history + [{"role": "assistant", "content": auto.choices[0].message.content}] + user("Tomorrow?")
    none = client.chat.completions.create(model="model.gguf", messages=follow_up, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, extra_body=pushy, **GREEDY)
    # the follow-up reuses the whole first turn (its tools-bearing system prompt included)
    assert none.usage.prompt_tokens_details.cached_tokens >= auto.usage.prompt_tokens
    msg = none.choices[0].message
    assert not msg.tool_calls and none.choices[0].finish_reason in ("stop", "length")
    assert "<tool_call>" not in (msg.content or "")
    # control: the same bias without the ban does write <tool_call> (left as text when no tools are declared)
    free = client.chat.completions.create(model="model.gguf", messages=history, max_tokens=4, extra_body=pushy,
                                          **GREEDY)
    assert "<tool_call>" in free.choices[0].message.content

    system = "You forecast the weather. " * 12
    an_client = an(server)
    first = an_client.messages.create(model="model.gguf", system=system, max_tokens=4, tools=AN_TOOLS,
                                      messages=user("Rain in Oslo?"), thinking={"type": "disabled"})
    with an_client.messages.stream(model="model.gguf", system=system, max_tokens=8, tools=AN_TOOLS,
                                   tool_choice={"type": "none"}, messages=user("Rain in Oslo?"),
                                   thinking={"type": "disabled"}, extra_body={"temperature": 0}) as stream:
        kinds = {getattr(ev, "content_block", None) and ev.content_block.type for ev in stream}
        msg = stream.get_final_message()
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == total
    assert msg.usage.cache_read_input_tokens >= total - 1
    assert "tool_use" not in kinds and all(b.type != "tool_use" for b in msg.content)
    assert msg.stop_reason in ("end_turn", "max_tokens")


def test_history_reasoning_counts_in_any_field_clients_use(server):
    """Agents send earlier reasoning back as reasoning_content, reasoning (vLLM) or reasoning_details
    (OpenRouter): each is rendered into the prompt the same way (GLM keeps it after the last user turn)."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}
    forms = [{}, {"reasoning_content": "Rome first."}, {"reasoning": "Rome first."},
             {"reasoning_details": [{"type": "reasoning.text", "text": "Rome first."}]}]
    counts = []
    for extra in forms:
        history = user("Forecast?") + [{"role": "assistant", "content": "", "tool_calls": [call], **extra},
                                       {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        r = oa(server).chat.completions.create(model="model.gguf", messages=history, tools=TOOLS, max_tokens=1,
                                               **GREEDY)
        counts.append(r.usage.prompt_tokens)
    assert counts[1] == counts[2] == counts[3] > counts[0]


def test_routes_without_the_v1_prefix_need_the_key_too(server):
    """A base URL without /v1 (a common client setting) works, as with llama.cpp's server; auth still applies."""
    bare = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    r = bare.chat.completions.create(model="model.gguf", messages=user("hi"), max_tokens=3, **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    assert [m.id for m in bare.models.list().data] == ["model.gguf"]
    assert bare.completions.create(model="model.gguf", prompt="Once", max_tokens=2).usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert httpx.post(server.url + "/chat/completions", json={}).status_code == 401
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/v1/chat/completions" in paths and "/chat/completions" not in paths  # one documented route


def test_idle_keep_alive_connection_outlives_client_pools(server):
    """httpx pools idle connections for 5 s and undici for 4 s: the server must keep them longer (uvicorn's
    5 s default races with the client, which then sees "Server disconnected without sending a response")."""
    with httpx.Client(limits=httpx.Limits(keepalive_expiry=30)) as client:
        def local_port():
            r = client.get(server.url + "/health")
            assert r.status_code == 200
            return r.extensions["network_stream"].get_extra_info("client_addr")[1]
        first = local_port()
        time.sleep(6)
        assert local_port() == first  # the same TCP connection, still open after 6 s idle


def test_web_pages_cannot_drive_the_local_model(gguf_factory):
    """A page on another site (CSRF) or a DNS name rebound to 127.0.0.1 gets 403 in each API's shape; local
    pages, VS Code webviews and non-browser clients (no Origin, loopback Host) are served. No API key here:
    on loopback the guard is what stands between a web page and the model."""
    srv = ServeProcess(gguf_factory("tiny", "q4_k_m"), "--ctx", "1024")
    try:
        body = {"model": "model.gguf", "messages": user("hi"), "max_tokens": 1}
        port = srv.port

        def post(path, **headers):
            return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)

        evil = post("/v1/chat/completions", Origin="http://evil.example")
        assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
        assert post("/v1/messages", Origin="https://evil.example").json()["type"] == "error"
        assert post("/v1/chat/completions", Origin="null").status_code == 403  # sandboxed iframes
        rebound = httpx.get(srv.url + "/v1/models", headers={"Host": f"attacker.example:{port}"})
        assert rebound.status_code == 403 and "DNS rebinding" in rebound.json()["error"]["message"]
        for ok in ({"Origin": "http://localhost:5173"}, {"Origin": "vscode-webview://1a2b3c"},
                   {"Host": f"localhost:{port}"}, {}):
            assert post("/v1/chat/completions", **ok).status_code == 200, ok
        assert oa(srv, key=None).models.list().data  # the SDK: no Origin, Host 127.0.0.1
    finally:
        srv.stop()


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
    if isinstance(case.body, dict):  # keep each generation short (each API's field); every other field stays fuzzed
        case.body["max_tokens"], case.body["max_completion_tokens"], case.body["max_output_tokens"] = 4, None, 4
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
