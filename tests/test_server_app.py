"""The HTTP layer against a scripted backend: real openai/anthropic SDKs and raw httpx on 127.0.0.1.

Covers translation end to end, auth, error shapes, limits, the bounded queue and cancellation on disconnect.
The same paths against the real engine and a fixture GGUF are in tests/test_server_live.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from glmlocal.errors import InputError
from glmlocal.server.app import ServerConfig, create_app
from glmlocal.server.security import check_bind, is_loopback
from tests.server_fakes import FakeBackend, ThreadServer

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}]


def serve(backend=None, **cfg):
    cfg.setdefault("model_id", "glm-4.6")
    cfg.setdefault("aliases", ("glm46",))
    return ThreadServer(create_app(backend or FakeBackend(), ServerConfig(**cfg)))


@pytest.fixture(scope="module")
def live():
    backend = FakeBackend()
    with serve(backend) as srv:
        srv.backend = backend
        yield srv


def oa_client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=20)


def an_client(srv, **kw):
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=srv.url, max_retries=0, timeout=20, **kw)


def test_openai_sdk_plain_and_streamed(live):
    client = oa_client(live)
    r = client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "".join(f"w{i} " for i in range(8))
    assert r.choices[0].message.reasoning_content == "Let me think."
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(client.chat.completions.create(model="GLM46", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"chat_template_kwargs": {"enable_thinking": False}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 8 and live.backend.seen[-1].enable_thinking is False


def test_openai_sdk_streamed_forced_tool_call(live):
    stream = oa_client(live).chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": "weather in Paris"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "weather"}}, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "args": ""})
            entry["args"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["id"] == "call_fake0" and calls[0]["name"] == "weather"
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "days": 3}


def test_openai_completions_endpoint(live):
    client = oa_client(live)
    r = client.completions.create(model="glm-4.6", prompt="Once upon", max_tokens=3)
    assert r.choices[0].text == " t0 t1 t2" and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="glm-4.6", prompt="Once upon", max_tokens=3, stream=True))
    assert streamed == r.choices[0].text


def test_anthropic_sdk_plain_streamed_and_count_tokens(live):
    client = an_client(live)
    kwargs = dict(model="claude-sonnet-4-6", max_tokens=2048, messages=[{"role": "user", "content": "hi"}],
                  system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
                  thinking={"type": "enabled", "budget_tokens": 1024}, metadata={"user_id": "x"})
    msg = client.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.content[0].signature
    assert msg.stop_reason == "end_turn" and msg.usage.cache_read_input_tokens > 0
    with client.messages.stream(**kwargs) as stream:
        names = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == msg.content[1].text
    assert final.usage.output_tokens == msg.usage.output_tokens
    count = client.messages.count_tokens(model="claude-sonnet-4-5", messages=kwargs["messages"])
    assert count.input_tokens > 0


def test_anthropic_sdk_tool_use_round_trip(live):
    client = an_client(live)
    tools = [{"name": "weather", "description": "w", "input_schema": TOOLS[0]["function"]["parameters"]}]
    with client.messages.stream(model="glm-4.6", max_tokens=64, tools=tools,
                                tool_choice={"type": "tool", "name": "weather"},
                                messages=[{"role": "user", "content": "Paris?"}]) as stream:
        msg = stream.get_final_message()
    use = msg.content[-1]
    assert msg.stop_reason == "tool_use" and use.type == "tool_use" and use.input == {"city": "Paris", "days": 3}
    history = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": msg.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    reply = client.messages.create(model="glm-4.6", max_tokens=64, tools=tools, messages=history)
    assert reply.stop_reason == "end_turn"
    sent = live.backend.seen[-1].messages
    assert sent[-1] == {"role": "tool", "tool_call_id": use.id, "content": "sunny"}
    assert sent[-2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 3}


def test_error_shapes_and_statuses(live):
    with pytest.raises(openai.NotFoundError):
        oa_client(live).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError):
        an_client(live).messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as e:
        an_client(live).messages.create(model="glm-4.6", max_tokens=5, messages=[])
    assert e.value.body["type"] == "error"
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/messages", json={"model": "glm-4.6", "messages": "nope"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["message"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    assert oa_client(live).models.list().data[0].id == "glm-4.6"
    assert an_client(live).models.list().data[0].id == "glm-4.6"


def test_context_overflow_is_400_with_counts():
    with serve(FakeBackend(n_ctx=64)) as srv:
        with pytest.raises(openai.BadRequestError) as e:
            oa_client(srv).chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "x" * 2000}])
        assert e.value.code == "context_length_exceeded" and "64 tokens" in e.value.message
        with pytest.raises(anthropic.BadRequestError) as e2:
            an_client(srv).messages.create(model="glm-4.6", max_tokens=5, messages=[{"role": "user", "content": "x" * 2000}])
        assert "prompt is too long: " in e2.value.message and "> 63 maximum (the context is 64 tokens)" in e2.value.message


def test_api_key_required_bearer_or_x_api_key():
    with serve(api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError):
            oa_client(srv, key="wrong").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            an_client(srv, api_key="wrong").messages.create(model="glm-4.6", max_tokens=5,
                                                            messages=[{"role": "user", "content": "x"}])
        assert httpx.post(srv.url + "/v1/messages", json={}).status_code == 401
        assert oa_client(srv, key="s3cret").models.list().data
        assert an_client(srv, api_key=None, auth_token="s3cret").messages.count_tokens(
            model="glm-4.6", messages=[{"role": "user", "content": "x"}]).input_tokens > 0
        assert an_client(srv, api_key="s3cret").messages.create(
            model="glm-4.6", max_tokens=5, messages=[{"role": "user", "content": "x"}]).content
        assert httpx.get(srv.url + "/health").status_code == 200


def test_body_size_limit():
    with serve(max_body_bytes=10_000) as srv:
        big = {"model": "glm-4.6", "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = httpx.post(srv.url + "/v1/chat/completions", json=big)
        assert r.status_code == 413
        chunked = httpx.post(srv.url + "/v1/messages", content=iter([json.dumps(big).encode()]))
        assert chunked.status_code == 413 and chunked.json()["type"] == "error"
        assert httpx.get(srv.url + "/health").status_code == 200


def test_no_cors_unless_asked():
    origin = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    with serve() as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    with serve(cors_origins=("http://ok.example",)) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions",
                          headers={**origin, "Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        body = {"model": "glm-4.6", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        ok = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Origin": "http://ok.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
        assert httpx.post(srv.url + "/v1/chat/completions", json=body,
                          headers={"Origin": "http://evil.example"}).status_code == 403


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost:3000", True), ("https://127.0.0.1", True), ("http://[::1]:8080", True),
    ("http://app.localhost:5173", True), ("vscode-webview://abc", True), ("tauri://localhost", True),
    ("http://evil.example", False), ("null", False), ("http://127.0.0.1.evil.example", False),
    ("chrome-extension://abcdef", False), ("http://ok.example", True),
])
def test_origin_policy(origin, allowed):
    from glmlocal.server.security import origin_allowed

    assert origin_allowed(origin, ("http://ok.example",)) is allowed


def test_full_queue_answers_429_with_retry_after():
    backend = FakeBackend(delay=0.05, tokens=20)
    with serve(backend, max_queue=1) as srv:
        async def fire():
            async with httpx.AsyncClient(timeout=30) as c:
                body = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]}
                return await asyncio.gather(*[c.post(srv.url + "/v1/chat/completions", json=body) for _ in range(5)])

        rs = asyncio.run(fire())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) == 2 and codes.count(429) == 3
        busy = next(r for r in rs if r.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation_and_frees_the_engine(stream):
    backend = FakeBackend(delay=0.05, tokens=400)
    with serve(backend) as srv:
        body = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}], "stream": stream}

        def client():
            try:
                with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=0.6) as r:
                    for _ in r.iter_bytes():
                        break
            except httpx.TimeoutException:
                pass

        t0 = time.monotonic()
        thread = threading.Thread(target=client)
        thread.start()
        thread.join(5)
        deadline = time.monotonic() + 5
        while backend.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.cancelled == 1 and time.monotonic() - t0 < 3  # 400 tokens would take 20 s
        r = oa_client(srv).chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=3)
        assert r.choices[0].finish_reason == "length"


class _CacheProbeFails(FakeBackend):
    def cached_prefix(self, prepared):
        raise RuntimeError("KV cache probe failed")


def test_a_failed_cache_probe_does_not_keep_a_queue_place():
    """The Anthropic stream asks the engine for the cached prefix (message_start's cache_read_input_tokens):
    if that raises, the request fails alone; with one place and no queue, the next request still runs."""
    backend = _CacheProbeFails()
    with serve(backend, parallel=1, max_queue=0) as srv:
        body = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        failed = httpx.post(srv.url + "/v1/messages", json={**body, "stream": True}, timeout=10)
        assert failed.status_code == 500 and "KV cache probe failed" in failed.json()["error"]["message"]
        assert httpx.get(srv.url + "/health", timeout=10).json()["running"] == 0
        for _ in range(2):
            r = httpx.post(srv.url + "/v1/messages", json=body, timeout=10)
            assert r.status_code == 200 and r.json()["stop_reason"] == "max_tokens", r.text
        assert backend.finished == 2


def test_bind_policy():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(InputError):
        check_bind("0.0.0.0", None, False)


def test_busy_port_is_one_clear_error_before_any_model_load():
    from glmlocal.server.run import open_socket

    first = open_socket("127.0.0.1", 0)
    try:
        with pytest.raises(InputError, match="cannot listen on 127.0.0.1"):
            open_socket("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_a_failed_model_load_releases_the_port(tmp_path):
    """serve binds before the slow load; a load that fails closes that socket again."""
    from glmlocal.server.run import ServeArgs, open_socket, run_serve
    from tests.server_live import free_port

    port = free_port()
    with pytest.raises(InputError, match="no such file") as failed:
        run_serve(ServeArgs(model=str(tmp_path / "missing.gguf"), port=port), err=io.StringIO())
    assert failed.traceback  # it keeps run_serve's frame, and a leaked socket in it, alive
    open_socket("127.0.0.1", port).close()  # would be "another program is listening there"


# ---------------------------------------------------------------------------------------------
# one render and one tokenization per chat request
# ---------------------------------------------------------------------------------------------
CHAT_ROUTES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 3}),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
]


def test_each_chat_request_is_prepared_once_and_generated_from_that(live):
    for path, body in CHAT_ROUTES:
        before, seen = live.backend.prepared, len(live.backend.seen)
        r = httpx.post(live.url + path, json={"model": "glm-4.6", **body}, timeout=20)
        assert r.status_code == 200, r.text
        assert live.backend.prepared == before + 1, path
        assert len(live.backend.seen) == seen + (path != "/v1/messages/count_tokens")


def _spy(calls: list, fn):
    def wrapped(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return fn(*args, **kwargs)
    return wrapped


def test_the_real_session_renders_and_tokenizes_each_request_once(gguf_factory):
    """The real app, SessionBackend, Session, template and engine: the preflight's render and tokenization is
    the one the turn generates from, on every chat route and on /v1/completions."""
    from glmlocal.engine.engine import Engine
    from glmlocal.engine.session import Session
    from glmlocal.glm.template import ChatTemplate
    from glmlocal.plan.placement import Placement
    from glmlocal.server.backend import SessionBackend

    with Engine.load(gguf_factory("tiny", "q4_k_m"), Placement.cpu_only(ctx=1024, threads=2)) as engine:
        template = ChatTemplate.builtin("glm45")
        template.starts_in_thinking()  # its generation-prompt probe renders once per template, not per request
        renders, tokenized = [], []
        template.render, engine.tokenize = _spy(renders, template.render), _spy(tokenized, engine.tokenize)
        with serve(SessionBackend(Session(engine, template, "glm45"))) as srv:
            for path, body in CHAT_ROUTES:
                renders.clear(), tokenized.clear()
                r = httpx.post(srv.url + path, json={"model": "glm-4.6", "temperature": 0, **body}, timeout=60)
                assert r.status_code == 200, r.text
                assert len(renders) == 1 and len(tokenized) == 1, path
                assert tokenized[0].startswith("[gMASK]") and renders[0] == [{"role": "user", "content": "hi"}]
            for stream in (False, True):  # a raw completion: no render, its prompt tokenized once
                renders.clear(), tokenized.clear()
                r = httpx.post(srv.url + "/v1/completions", json={"model": "glm-4.6", "prompt": "Once upon",
                               "max_tokens": 3, "temperature": 0, "stream": stream}, timeout=60)
                assert r.status_code == 200, r.text
                assert renders == [] and tokenized == ["Once upon"], stream
