"""The OpenAI Responses API front door (POST /v1/responses, glmlocal/server/responses_request.py and responses.py).

Three layers: pure translation tables (items -> messages, events -> SSE events validated against the openai
SDK's own pydantic event types), the HTTP layer with the scripted FakeBackend (error shapes, disconnects),
and the real openai SDK against a live `glmlocal serve` with the real engine and a fixture GGUF.
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.server import responses as rs
from glmlocal.server import responses_request as rq
from glmlocal.server.app import ServerConfig, create_app
from glmlocal.server.errors import APIError
from glmlocal.server.types import Usage
from tests.server_fakes import FakeBackend, ThreadServer
from tests.server_live import ServeProcess

EVENT = TypeAdapter(ResponseStreamEvent)
KEY = "resp-key-1"
# Enumerated values: the fixture model is random, so a free-form string argument would run to max_tokens.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                           "days": {"type": "integer", "enum": [1, 2, 3]},
                                           "metric": {"type": "boolean"}},
          "required": ["city", "days", "metric"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "weather", "description": "Forecast", "parameters": SCHEMA, "strict": True}]
GREEDY = {"temperature": 0, "extra_body": {"seed": 1}}
NO_THINK = {"reasoning": {"effort": "none"}}


def body(**kw) -> rq.ResponsesRequest:
    kw.setdefault("input", "hi")
    return rq.ResponsesRequest(**kw)


# ---------------------------------------------------------------------------------------------
# pure translation
# ---------------------------------------------------------------------------------------------
def test_input_items_become_the_chat_history():
    """One earlier response (reasoning, message, two calls) folds back into one assistant message, followed
    by the tool results in order; developer becomes system; instructions lead."""
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                                        {"type": "input_image", "image_url": "data:..."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Both."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "Call again."}]},
        {"type": "function_call", "call_id": "c3", "name": "weather", "arguments": ""},
        {"type": "function_call_output", "call_id": "c3", "output": "snow"},
        {"role": "user", "content": "Thanks"},
    ]
    turn = rq.to_turn(body(instructions="You forecast.", input=items, tools=TOOLS))
    calls = lambda *pairs: [{"id": i, "type": "function", "function": {"name": "weather", "arguments": a}}
                            for i, a in pairs]
    assert turn.messages == [
        {"role": "system", "content": "You forecast."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?\n[image omitted: this model reads text only]"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Both.",
         "tool_calls": calls(("c1", {"city": "Rome"}), ("c2", {"city": "Oslo"}))},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "content": "", "reasoning_content": "Call again.", "tool_calls": calls(("c3", {}))},
        {"role": "tool", "tool_call_id": "c3", "content": "snow"},
        {"role": "user", "content": "Thanks"},
    ]
    assert turn.tools == [{"type": "function", "function": {"name": "weather", "parameters": SCHEMA,
                                                            "description": "Forecast"}}]


@pytest.mark.parametrize("item, expected", [
    ({"content": [{"type": "reasoning_text", "text": "a"}], "summary": [{"type": "summary_text", "text": "b"}]}, "a"),
    ({"summary": [{"type": "summary_text", "text": "b"}, {"type": "summary_text", "text": "c"}]}, "b\nc"),
    ({"summary": [], "encrypted_content": rq.encode_reasoning("from the blob ü")}, "from the blob ü"),
    ({"summary": [], "encrypted_content": "gAAAA-openai-opaque"}, ""),
    ({"summary": [], "encrypted_content": rq.ENCRYPTED_PREFIX + "not base64!"}, ""),
])
def test_reasoning_items_sent_back_keep_their_text(item, expected):
    assert rq.reasoning_text({"type": "reasoning", **item}) == expected


def test_odd_but_valid_content_is_flattened_not_refused():
    items = [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
             {"type": "function_call_output", "call_id": "c", "output": {"ok": True}},
             {"type": "reasoning", "content": "not a list", "summary": 5},
             {"role": "assistant", "content": None}]
    assert rq.to_turn(body(input=items)).messages == [
        {"role": "assistant", "content": "No."}, {"role": "tool", "tool_call_id": "c", "content": '{"ok": true}'},
        {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("effort, kwargs, enable", [
    (None, None, True), ("minimal", None, False), ("none", None, False), ("low", None, True),
    ("high", None, True), ("high", {"enable_thinking": False}, False),
])
def test_reasoning_effort_switches_thinking(effort, kwargs, enable):
    turn = rq.to_turn(body(reasoning={"effort": effort}, chat_template_kwargs=kwargs))
    assert turn.enable_thinking is enable


def test_tools_choices_formats_and_sampling():
    tools = TOOLS + [{"type": "web_search"}, {"type": "custom", "name": "apply_patch"}, {"type": "local_shell"}]
    b = body(tools=tools, tool_choice={"type": "function", "name": "weather"}, parallel_tool_calls=False,
             max_output_tokens=7, temperature=0.2, top_p=0.9, seed=-1,
             text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA, "strict": True}})
    turn = rq.to_turn(b)
    assert [t["function"]["name"] for t in turn.tools] == ["weather"]
    assert rq.ignored_tools(b) == ["web_search", "apply_patch", "local_shell"]
    assert turn.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert not turn.parallel_tool_calls and turn.max_tokens == 7
    assert turn.sampling == {"temperature": 0.2, "top_p": 0.9, "seed": 0xFFFFFFFF}
    assert turn.response_format == {"type": "json_schema",
                                    "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    assert rq.to_turn(body(text={"format": {"type": "json_object"}})).response_format == {"type": "json_object"}
    assert rq.to_turn(body(text={"format": {"type": "text"}})).response_format is None
    assert rq.to_turn(body(tools=TOOLS, tool_choice="required")).tool_choice == "required"
    assert rq.to_turn(body(tools=TOOLS, tool_choice="none")).tool_choice == "none"
    echo = rq.echo_of(b)
    assert echo["tools"] == TOOLS and echo["max_output_tokens"] == 7 and not echo["parallel_tool_calls"]


@pytest.mark.parametrize("kw, needle", [
    ({"previous_response_id": "resp_abc"}, "stateless"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "stateless"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "'web_search_call' is not supported"),
    ({"input": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"input": [{"role": "user", "content": 5}]}, "string or a list"),
    ({"input": [{"role": "user", "content": ["bare string"]}]}, "content part must be an object"),
    ({"input": [{"type": "function_call", "name": "weather", "arguments": "{}"}]}, "call_id"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
    ({"input": ["hello"]}, "input[0] must be an object"),
    ({"tool_choice": "required"}, "needs at least one function tool"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "'nope'"),
    ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "not supported"),
    ({"tools": [{"type": "function", "parameters": {}}]}, "needs a name"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
    ({"text": {"format": {"type": "yaml"}}}, "'yaml'"),
    ({"input": [{"type": "function_call", "name": "f", "call_id": "c", "arguments": 5}]}, "JSON string"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]}, "JSON schema object"),
    ({"tools": [{"type": "namespace", "name": "n", "tools": [3]}]}, "tools[0] must be an object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": ["weather"]}}, "not among"),
])
def test_inconsistent_requests_are_400(kw, needle):
    with pytest.raises(APIError) as e:
        rq.to_turn(body(**kw))
    assert e.value.status == 400 and needle in e.value.message


TEXT_TURN = [ReasoningDelta("Hm"), ReasoningDelta("m."), ContentDelta("Hel"), ContentDelta("lo"), Finish("stop"),
             Usage(12, 5, 4, reasoning_tokens=2)]
CALL_TURN = [ContentDelta("Sure."), ToolCallStart(0, "call_a", "weather"), ToolCallArgsDelta(0, '{"city": '),
             ToolCallArgsDelta(0, '"Rome"}'), ToolCallEnd(0, "weather", {"city": "Rome"}, "call_a"),
             ToolCallStart(1, "call_b", "weather"), ToolCallEnd(1, "weather", {"city": "Oslo"}, "call_b"),
             Finish("tool_calls"), Usage(30, 20, 0)]
CUT_TURN = [ReasoningDelta("x"), ToolCallStart(0, "call_c", "weather"), ToolCallArgsDelta(0, '{"ci'),
            Finish("length"), Usage(9, 4, 0)]


def stream_of(items, encrypt=False, summary=None):
    b = body(tools=TOOLS, include=["reasoning.encrypted_content"] if encrypt else None,
             reasoning={"summary": summary})
    stream = rs.ResponseStream("glm", rq.echo_of(b))
    events = stream.start() + [ev for item in items for ev in stream.feed(item)]
    for name, data in events:  # every event is exactly one of the SDK's own types
        assert EVENT.validate_python(data).type == name
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    return events


def test_stream_events_for_text_and_reasoning():
    events = stream_of(TEXT_TURN, encrypt=True)
    assert [n for n, _ in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    done = [d for n, d in events if n == "response.output_item.done"]
    assert [d["output_index"] for d in done] == [0, 1]
    assert done[0]["item"]["content"] == [{"type": "reasoning_text", "text": "Hmm."}]
    assert rq.reasoning_text(done[0]["item"] | {"content": None}) == "Hmm."  # via encrypted_content
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == "Hello" and final.status == "completed"
    assert final.usage.input_tokens_details.cached_tokens == 4 and final.usage.output_tokens_details.reasoning_tokens == 2
    assert final.tools[0].name == "weather"
    ids = {d["item_id"] for n, d in events if "item_id" in d}
    assert ids == {d["item"]["id"] for d in done}


def test_reasoning_is_mirrored_into_the_summary_when_one_is_asked_for():
    """Codex asks for summary "auto" and shows summaries: the thinking streams as both; sent back, it counts once."""
    events = stream_of(TEXT_TURN, summary="auto")
    assert [n for n, _ in events][2:13] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_summary_part.added",
        "response.reasoning_text.delta", "response.reasoning_summary_text.delta", "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"]
    final = Response.model_validate(events[-1][1]["response"])
    item = final.output[0]
    assert item.summary[0].text == item.content[0].text == "Hmm." and final.reasoning.summary == "auto"
    turn = rq.to_turn(body(input=[{"role": "user", "content": "q"}, item.model_dump(), final.output[1].model_dump()]))
    assert turn.messages[1]["reasoning_content"] == "Hmm."
    cut = stream_of([ReasoningDelta("x"), Finish("length"), Usage(3, 1, 0)], summary="detailed")
    assert cut[-2][1]["item"]["summary"] == [{"type": "summary_text", "text": "x"}]
    assert [d.get("status") for n, d in cut if n == "response.reasoning_summary_part.done"] == ["incomplete"]


def test_stream_events_for_function_calls():
    events = stream_of(CALL_TURN)
    calls = [d for n, d in events if n == "response.function_call_arguments.done"]
    assert [c["arguments"] for c in calls] == ['{"city": "Rome"}', '{"city": "Oslo"}']
    assert [c["output_index"] for c in calls] == [1, 2]
    final = Response.model_validate(events[-1][1]["response"])
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert [(o.call_id, o.status) for o in final.output[1:]] == [("call_a", "completed"), ("call_b", "completed")]


def test_truncated_stream_is_incomplete_and_drops_the_cut_call():
    events = stream_of(CUT_TURN)
    assert events[-1][0] == "response.incomplete"
    item_done = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert [(i["type"], i["status"]) for i in item_done] == [("reasoning", "completed"),
                                                             ("function_call", "incomplete")]
    final = Response.model_validate(events[-1][1]["response"])
    assert final.incomplete_details.reason == "max_output_tokens" and [o.type for o in final.output] == ["reasoning"]
    assert "response.function_call_arguments.done" not in [n for n, _ in events]


def test_aggregate_matches_the_stream():
    for items in (TEXT_TURN, CALL_TURN, CUT_TURN):
        agg = rs.ResponseAggregate("glm", rq.echo_of(body()))
        for item in items:
            agg.feed(item)
        whole = Response.model_validate(agg.response_json())
        streamed = Response.model_validate(stream_of(items)[-1][1]["response"])
        strip = lambda r: [o.model_dump(exclude={"id"}) for o in r.output]
        assert strip(whole) == strip(streamed) and whole.status == streamed.status


def test_namespace_tools_are_flattened_and_their_calls_say_so():
    """Codex groups some tools in a namespace; its functions are offered like any other, and a call to one
    comes back with `namespace` set (the SDK's ResponseFunctionToolCall field) so Codex routes it."""
    spawn = {"type": "function", "name": "spawn_agent", "parameters": {"type": "object", "properties": {}}}
    ns = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents",
          "tools": [spawn, {"type": "custom", "name": "apply_patch"}]}
    b = body(tools=TOOLS + [ns], tool_choice={"type": "function", "name": "spawn_agent"})
    turn = rq.to_turn(b)
    assert [t["function"]["name"] for t in turn.tools] == ["weather", "spawn_agent"]
    assert rq.ignored_tools(b) == ["apply_patch"]
    stream = rs.ResponseStream("glm", rq.echo_of(b))
    events = stream.start() + [e for it in (ToolCallStart(0, "c9", "spawn_agent"), ToolCallEnd(0, "spawn_agent", {}, "c9"),
                                            Finish("tool_calls"), Usage(5, 3, 0)) for e in stream.feed(it)]
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output[0].namespace == "multi_agent_v1" and final.output[0].arguments == "{}"
    assert [t.type for t in final.tools] == ["function", "namespace"]
    with pytest.raises(APIError, match="unique"):
        rq.to_turn(body(tools=TOOLS + [{**ns, "tools": TOOLS}]))


def test_failure_after_the_stream_started_is_reported_in_band():
    stream = rs.ResponseStream("glm", rq.echo_of(body()))
    stream.start()
    events = stream.feed(ContentDelta("x")) + stream.fail({"message": "engine error: boom", "code": None,
                                                           "type": "server_error"})
    for _, data in events:
        EVENT.validate_python(data)
    assert [n for n, _ in events][-2:] == ["error", "response.failed"]
    assert events[-1][1]["response"]["error"] == {"code": "server_error", "message": "engine error: boom"}


# ---------------------------------------------------------------------------------------------
# HTTP layer, scripted backend
# ---------------------------------------------------------------------------------------------
class BrokenBackend(FakeBackend):
    def chat(self, turn, prepared, cancel):
        yield ContentDelta("partial")
        raise RuntimeError("boom")


def test_sdk_against_scripted_backend_errors_and_disconnect():
    backend = FakeBackend(delay=0.05, tokens=40)
    with ThreadServer(create_app(backend, ServerConfig(model_id="glm", api_key=KEY, max_queue=0))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="bad", max_retries=0).responses.create(
                model="glm", input="x")
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="glm", input=[])
        assert e.value.body["type"] == "invalid_request_error" and "input" in e.value.message
        # the client leaves after the first text delta: the generation is cancelled, not run to the end
        with httpx.stream("POST", srv.url + "/responses", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "glm", "input": "hi", "stream": True}, timeout=20) as r:
            for line in r.iter_lines():
                if "response.output_text.delta" in line:
                    break
            with pytest.raises(openai.RateLimitError) as e:  # one running, no queue: the next one is refused
                client.responses.create(model="glm", input="me too")
            assert int(e.value.response.headers["retry-after"]) >= 1 and e.value.code == "queue_full"
        deadline = time.monotonic() + 10
        while not backend.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.cancelled == 1 and backend.finished == 0
    with ThreadServer(create_app(BrokenBackend(), ServerConfig(model_id="glm"))) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        kinds = [ev.type for ev in client.responses.create(model="glm", input="hi", stream=True)]
        assert kinds[-2:] == ["error", "response.failed"]
        with pytest.raises(openai.InternalServerError):
            client.responses.create(model="glm", input="hi")


# ---------------------------------------------------------------------------------------------
# live: the real engine behind `glmlocal serve`
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(gguf_factory):
    # GLM-4.7 layout: its generation prompt opens <think>, so thinking on always yields reasoning here.
    proc = ServeProcess(gguf_factory("tiny", "q4_k_m", family="glm47"), "--ctx", "2048", api_key=KEY)
    yield proc
    proc.stop()


def client_of(srv, key=KEY):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=300)  # 2 busy cores


def test_live_plain_and_streamed_text_agree(server):
    client = client_of(server)
    plain = client.responses.create(model="model.gguf", input="Hello there", max_output_tokens=12, **NO_THINK,
                                    **GREEDY)
    assert plain.id.startswith("resp_") and plain.object == "response" and plain.model == "model.gguf"
    assert [o.type for o in plain.output] == ["message"] and plain.output_text
    assert plain.usage.output_tokens > 0 and plain.usage.output_tokens_details.reasoning_tokens == 0
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    with client.responses.stream(model="model.gguf", input="Hello there", max_output_tokens=12, **NO_THINK,
                                 **GREEDY) as stream:
        events = list(stream)
    final = events[-1].response  # the random model runs to the limit: get_final_response() wants "completed"
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if final.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == plain.output_text
    assert final.status == plain.status and final.usage.output_tokens == plain.usage.output_tokens


def test_live_forced_call_then_tool_result_round_trip_reuses_cache(server):
    client = client_of(server)
    question = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    first = client.responses.create(model="model.gguf", input=question, tools=TOOLS, max_output_tokens=200,
                                    tool_choice={"type": "function", "name": "weather"}, **NO_THINK, **GREEDY)
    call = next(o for o in first.output if o.type == "function_call")
    args = json.loads(call.arguments)
    jsonschema.validate(args, SCHEMA)
    assert call.name == "weather" and call.call_id and call.status == "completed" and first.status == "completed"
    assert type(args["days"]) is int and type(args["metric"]) is bool
    follow = question + [o.model_dump(exclude_none=True) for o in first.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"forecast": "sunny", "high": 24}'}]
    second = client.responses.create(model="model.gguf", input=follow, tools=TOOLS, max_output_tokens=6, **NO_THINK,
                                     **GREEDY)
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens
    # everything up to the new tool result was already in the KV cache
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1


def test_live_streamed_required_call(server):
    hosted = [{"type": "web_search", "external_web_access": False}]  # Codex sends it; only OpenAI can run it
    with client_of(server).responses.stream(model="model.gguf", input="Oslo, 2 days", tools=TOOLS + hosted,
                                            tool_choice="required", max_output_tokens=200, **NO_THINK,
                                            **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments
    call = next(o for o in final.output if o.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
    assert call.arguments == done.arguments and call.id == done.item_id
    assert "ignoring non-function tools (hosted or custom): web_search" in server.output()


def test_live_reasoning_on_and_off(server):
    client = client_of(server)
    on = client.responses.create(model="model.gguf", input="Think first", max_output_tokens=16,
                                 reasoning={"effort": "high", "summary": "auto"},
                                 include=["reasoning.encrypted_content"], **GREEDY)
    reasoning = on.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].type == "reasoning_text"
    assert reasoning.summary[0].text == reasoning.content[0].text
    assert reasoning.content[0].text and reasoning.encrypted_content.startswith(rq.ENCRYPTED_PREFIX)
    assert 0 < on.usage.output_tokens_details.reasoning_tokens <= on.usage.output_tokens
    off = client.responses.create(model="model.gguf", input="Think first", max_output_tokens=16,
                                  reasoning={"effort": "minimal"}, **GREEDY)
    assert all(o.type != "reasoning" for o in off.output) and off.output_text
    assert off.usage.output_tokens_details.reasoning_tokens == 0
    # the reasoning item sent back is rendered into the prompt (GLM-4.7 keeps it after the last user turn)
    back = [{"role": "user", "content": "Think first"}, reasoning.model_dump(exclude_none=True),
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Go on"}]
    without = [back[0], back[2], back[3]]
    counts = [client.responses.create(model="model.gguf", input=i, max_output_tokens=1, **NO_THINK).usage.input_tokens
              for i in (back, without)]
    assert counts[0] > counts[1]


def test_live_max_output_tokens_is_incomplete(server):
    client = client_of(server)
    r = client.responses.create(model="model.gguf", input="Tell me a story", max_output_tokens=3,
                                reasoning={"effort": "medium"}, **GREEDY)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[-1].status == "incomplete"
    kinds = [e.type for e in client.responses.create(model="model.gguf", input="Tell me a story", stream=True,
                                                      max_output_tokens=3, **GREEDY)]
    assert kinds[-1] == "response.incomplete" and "response.completed" not in kinds


def test_live_json_schema_text_format(server):
    r = client_of(server).responses.create(
        model="model.gguf", input="Pick a city", max_output_tokens=60, **NO_THINK, **GREEDY,
        text={"format": {"type": "json_schema", "name": "forecast", "schema": SCHEMA, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)


def test_live_errors_in_the_sdks_types(server):
    client = client_of(server)
    with pytest.raises(openai.AuthenticationError):
        client_of(server, key="wrong").responses.create(model="model.gguf", input="x", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-5-codex", input="x", max_output_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="model.gguf", input=[{"type": "mystery"}], max_output_tokens=2)
    assert "mystery" in e.value.message and e.value.param == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="model.gguf", input="x", previous_response_id="resp_123")
    assert "stateless" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="model.gguf", input="word " * 3000, max_output_tokens=2)
    assert e.value.code == "context_length_exceeded" and "2048" in e.value.message
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def responses_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})


@schemathesis.pytest.from_fixture("responses_schema").include(path="/v1/responses").parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_responses_no_5xx(case, server):
    if isinstance(case.body, dict):  # keep each generation short; every other field stays fuzzed
        case.body["max_output_tokens"] = 4
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
