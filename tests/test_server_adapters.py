"""Pure translation tables for the OpenAI and Anthropic adapters (no server, no engine)."""

from __future__ import annotations

import json

import pytest

from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.server import anthropic as an
from glmlocal.server import openai as oa
from glmlocal.server.errors import APIError
from glmlocal.server.types import Usage

TOOL = {"type": "function", "function": {"name": "weather", "description": "Weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL_EVENTS = [ReasoningDelta("hmm"), ContentDelta("Checking."), ToolCallStart(0, "call_a", "weather"),
               ToolCallArgsDelta(0, '{"city": '), ToolCallArgsDelta(0, '"Paris"}'),
               ToolCallEnd(0, "weather", {"city": "Paris"}, "call_a"), Finish("tool_calls"),
               Usage(prompt_tokens=50, completion_tokens=12, cached_tokens=30)]


def oa_turn(**body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return oa.to_turn(oa.ChatCompletionRequest(**body))


def test_openai_messages_are_normalised_for_the_template():
    turn = oa_turn(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "think",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    system, user, assistant, tool = turn.messages
    assert system == {"role": "system", "content": "be brief"}
    assert user["content"] == "look\n" + oa.IMAGE_PLACEHOLDER
    assert assistant["reasoning_content"] == "think"
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


@pytest.mark.parametrize("raw, expected", [
    ('{"a": 1}', {"a": 1}), ("", {}), (None, {}), ({"b": 2}, {"b": 2}), ("not json", {"arguments": "not json"}),
    ("[1, 2]", {"arguments": [1, 2]}),
])
def test_openai_tool_call_arguments_always_become_a_mapping(raw, expected):
    assert oa.arguments_dict(raw) == expected


@pytest.mark.parametrize("body, enable, clear", [
    ({}, True, None),
    ({"chat_template_kwargs": {"enable_thinking": False}}, False, None),
    ({"chat_template_kwargs": {"enable_thinking": True, "clear_thinking": False}}, True, False),
    ({"thinking": {"type": "disabled"}}, False, None),
    ({"reasoning_effort": "none"}, False, None),
    ({"reasoning_effort": "high"}, True, None),
])
def test_openai_thinking_switches(body, enable, clear):
    turn = oa_turn(**body)
    assert (turn.enable_thinking, turn.clear_thinking) == (enable, clear)


def test_openai_sampling_tool_choice_and_formats():
    turn = oa_turn(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "weather"}},
                   temperature=0.2, top_p=0.9, top_k=20, seed=-1, stop="END", max_completion_tokens=33, max_tokens=5,
                   response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert turn.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert turn.sampling == {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "seed": 0xFFFFFFFF}
    assert turn.stop == ["END"] and turn.max_tokens == 33
    assert turn.response_format["json_schema"]["schema"] == {"type": "object"}
    assert oa_turn(response_format={"type": "json_object"}).response_format == {"type": "json_object"}
    assert oa_turn(response_format={"type": "text"}).response_format is None


@pytest.mark.parametrize("body", [
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tool_choice": "required"},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
])
def test_openai_inconsistent_requests_are_400(body):
    with pytest.raises(APIError) as e:
        oa_turn(**body)
    assert e.value.status == 400


def test_openai_stream_chunks_reasoning_content_and_tool_call_deltas():
    stream = oa.ChatStream("glm", include_usage=True)
    chunks = [stream.start()] + [c for item in CALL_EVENTS for c in stream.feed(item)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "hmm", "reasoning": "hmm"} and deltas[2] == {"content": "Checking."}
    start = deltas[3]["tool_calls"][0]
    assert (start["id"], start["function"]["name"], start["function"]["arguments"]) == ("call_a", "weather", "")
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[4:6])
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 30


def test_openai_stream_sends_arguments_at_end_when_none_were_streamed():
    stream = oa.ChatStream("glm")
    out = stream.feed(ToolCallStart(0, "c", "noargs")) + stream.feed(ToolCallEnd(0, "noargs", {}, "c"))
    assert out[-1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_openai_aggregate_keeps_only_finished_calls():
    agg = oa.ChatAggregate("glm")
    for item in CALL_EVENTS[:-2] + [ToolCallStart(1, "call_b", "weather"), Finish("length"), CALL_EVENTS[-1]]:
        agg.feed(item)
    resp = agg.response()
    msg = resp["choices"][0]["message"]
    assert msg["content"] == "Checking." and msg["reasoning_content"] == msg["reasoning"] == "hmm"
    assert [c["id"] for c in msg["tool_calls"]] == ["call_a"]
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"] == {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62,
                             "prompt_tokens_details": {"cached_tokens": 30},
                             "completion_tokens_details": {"reasoning_tokens": 0}}


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------
BILLING = "x-anthropic-billing-header: cc_version=2.1.37.a1b; cc_entrypoint=cli; cch=%s;"


def an_turn(**body):
    body.setdefault("model", "claude-sonnet-4-5")
    body.setdefault("max_tokens", 100)
    return an.to_turn(an.MessagesRequest(**body))


def test_claude_code_billing_header_is_dropped_so_the_prefix_is_stable():
    turns = [an_turn(system=[{"type": "text", "text": BILLING % cch},
                             {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
                     messages=[{"role": "user", "content": "hi"}]) for cch in ("1a2b3", "9f9f9")]
    assert turns[0].messages == turns[1].messages
    assert turns[0].messages[0] == {"role": "system", "content": "You are Claude Code."}
    assert an.normalise_system("A\n" + BILLING % "x" + "\nB") == "A\nB"


def test_claude_code_system_message_inside_messages_is_kept_in_place():
    # Claude Code 2.1.332 (run against `glmlocal serve`) sends its environment block as a "system" message
    # after the first user turn; refusing it cost a 400 and a retry on every request.
    turn = an_turn(system="You are Claude Code.", messages=[
        {"role": "user", "content": "Say hello"},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\nPlatform: linux"}]},
    ])
    assert turn.messages == [{"role": "system", "content": "You are Claude Code."},
                             {"role": "user", "content": "Say hello"},
                             {"role": "system", "content": "# Environment\nPlatform: linux"}]


def test_anthropic_tool_results_and_assistant_blocks_translate():
    turn = an_turn(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "need tool", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
            {"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}}]},
    ], tools=[{"name": "weather", "input_schema": {"type": "object"}},
              {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "any"}, thinking={"type": "disabled"}, stop_sequences=["STOP"], temperature=0.5,
        metadata={"user_id": "u"})
    _user, assistant, r1, r2, user2 = turn.messages
    assert assistant == {"role": "assistant", "content": "Checking.", "reasoning_content": "need tool",
                         "tool_calls": [{"id": "toolu_1", "type": "function",
                                         "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    assert r1 == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert r2["content"] == "Error: boom"
    assert user2 == {"role": "user", "content": "thanks"}
    assert [t["function"]["name"] for t in turn.tools] == ["weather"]  # server tools cannot run here
    assert turn.tool_choice == "required" and turn.enable_thinking is False
    assert turn.stop == ["STOP"] and turn.sampling == {"temperature": 0.5} and turn.max_tokens == 100


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required"),
    ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
])
def test_anthropic_tool_choice(choice, expected):
    turn = an_turn(messages=[{"role": "user", "content": "x"}], tools=[{"name": "weather", "input_schema": {}}],
                   tool_choice=choice)
    assert turn.tool_choice == expected


def test_anthropic_unknown_forced_tool_is_400():
    with pytest.raises(APIError):
        an_turn(messages=[{"role": "user", "content": "x"}], tools=[{"name": "a", "input_schema": {}}],
                tool_choice={"type": "tool", "name": "b"})


def test_anthropic_stream_event_sequence():
    stream = an.MessageStream("glm", prompt_tokens=50, cached_tokens=28)
    events = stream.start() + [e for item in CALL_EVENTS for e in stream.feed(item)]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 22, "output_tokens": 0, "cache_read_input_tokens": 28,
                                                "cache_creation_input_tokens": 0}  # known before generating
    names = [n for n, _ in events]
    assert names == ["message_start",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    data = [d for _, d in events]
    assert data[2]["delta"] == {"type": "thinking_delta", "thinking": "hmm"}
    assert data[3]["delta"]["type"] == "signature_delta"
    assert data[8]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}
    assert json.loads(data[9]["delta"]["partial_json"] + data[10]["delta"]["partial_json"]) == {"city": "Paris"}
    assert [d["index"] for d in data[1:12]] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert data[12]["delta"]["stop_reason"] == "tool_use"
    assert data[12]["usage"] == {"input_tokens": 20, "output_tokens": 12, "cache_read_input_tokens": 30,
                                 "cache_creation_input_tokens": 0}


@pytest.mark.parametrize("reason, stop_seq, expected", [
    ("stop", None, "end_turn"), ("length", None, "max_tokens"), ("tool_calls", None, "tool_use"),
    ("stop", "STOP", "stop_sequence"),
])
def test_anthropic_stop_reasons(reason, stop_seq, expected):
    agg = an.MessageAggregate("glm")
    for item in [ContentDelta("x"), Finish(reason), Usage(3, 1, 0, stop_sequence=stop_seq)]:
        agg.feed(item)
    msg = agg.response()
    assert msg["stop_reason"] == expected and msg["stop_sequence"] == stop_seq


def test_anthropic_aggregate_blocks():
    agg = an.MessageAggregate("glm")
    for item in CALL_EVENTS:
        agg.feed(item)
    blocks = agg.response()["content"]
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    assert blocks[0]["signature"] and blocks[2]["input"] == {"city": "Paris"}


# ---------------------------------------------------------------------------------------------
# the backend: stop sequences, parallel tool calls and usage come from the session's TurnResult
# ---------------------------------------------------------------------------------------------
def test_backend_passes_stops_to_the_session_and_reports_its_stop_sequence():
    from types import SimpleNamespace

    from glmlocal.engine.generation import Sampling
    from glmlocal.engine.session import PreparedTurn, TurnResult
    from glmlocal.server.backend import SessionBackend
    from glmlocal.server.types import TurnRequest

    seen, closed = {}, []
    prepared = PreparedTurn("prompt", [1, 2, 3], None, None, False)

    def fake_run(prep, **k):
        assert prep is prepared  # generated from the preflight's render, not a second one
        seen.update(k)

        def gen():
            try:
                yield ContentDelta("answer ")
                yield Finish("stop")
                yield TurnResult("stop", 9, 4, 20, 0.1, 10.0, reasoning_tokens=7, stop_sequence="STOP")
            finally:
                closed.append(True)
        return gen()

    engine = SimpleNamespace(n_ctx=100)
    backend = SessionBackend(SimpleNamespace(engine=engine, run=fake_run, default_sampling=Sampling()))
    items = list(backend.chat(TurnRequest(messages=[], stop=["STOP"], parallel_tool_calls=False), prepared, None))
    assert seen["stop"] == ["STOP"] and seen["parallel_tool_calls"] is False
    assert seen["sampling"].stop == ()  # stop strings are the session's (content only), not the engine's
    assert items == [ContentDelta("answer "), Finish("stop"), Usage(9, 20, 4, stop_sequence="STOP", reasoning_tokens=7)]
    assert closed


def test_openai_usage_reports_reasoning_tokens():
    usage = oa.usage_json(Usage(10, 8, 4, reasoning_tokens=5))
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 5}
    assert usage["prompt_tokens_details"] == {"cached_tokens": 4} and usage["total_tokens"] == 18


def test_openai_timings_count_decode_speed_over_the_steps_after_the_first():
    t = oa.timings_json(Usage(100, 11, 20, prompt_s=0.5, decode_s=2.0))
    assert t["prompt_n"] == 80 and t["prompt_per_second"] == 160.0
    assert t["predicted_n"] == 11 and t["predicted_ms"] == 2000.0 and t["predicted_per_second"] == 5.0  # 10 steps
    assert oa.timings_json(Usage(100, 1, 0, prompt_s=0.5, decode_s=0.0))["predicted_per_second"] == 0.0


@pytest.mark.parametrize("bias, expected", [
    ({"151352": -100}, {151352: float("-inf")}), ({"7": 5.5, " 12": -3}, {7: 5.5, 12: -3.0}), (None, None),
])
def test_openai_logit_bias(bias, expected):
    turn = oa_turn(logit_bias=bias) if bias is not None else oa_turn()
    assert turn.sampling.get("logit_bias") == expected


@pytest.mark.parametrize("bias", [{"x": 1}, {"5": 101}, {"-3": 1}])
def test_openai_logit_bias_rejects_bad_entries(bias):
    with pytest.raises(APIError) as e:
        oa_turn(logit_bias=bias)
    assert e.value.status == 400 and e.value.param == "logit_bias"


def test_parallel_tool_call_switches():
    assert oa_turn(tools=[TOOL]).parallel_tool_calls is True
    assert oa_turn(tools=[TOOL], parallel_tool_calls=False).parallel_tool_calls is False
    tools = [{"name": "a", "input_schema": {"type": "object"}}]
    assert an_turn(messages=[{"role": "user", "content": "x"}], tools=tools).parallel_tool_calls is True
    off = an_turn(messages=[{"role": "user", "content": "x"}], tools=tools,
                  tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert off.parallel_tool_calls is False and off.tool_choice == "auto"


def test_context_overflow_speaks_each_apis_language():
    from glmlocal.errors import ContextOverflowError
    from glmlocal.server.errors import from_exception

    err = from_exception(ContextOverflowError(5000, 0, 4096))
    assert "maximum context length is 4096" in err.openai_body()["error"]["message"]
    assert err.openai_body()["error"]["code"] == "context_length_exceeded"
    # Claude Code recognises Anthropic's own wording and offers /compact
    assert err.anthropic_body()["error"]["message"].startswith("prompt is too long: 5000 tokens > 4095 maximum")
    # no max_tokens in the request: say the prompt leaves no room, not "asks for 0 more"
    assert "5000 prompt tokens and leaves no room for an answer" in err.openai_body()["error"]["message"]
    asked = from_exception(ContextOverflowError(4000, 200, 4096)).openai_body()["error"]["message"]
    assert "4000 prompt tokens and asks for 200 more" in asked


@pytest.mark.parametrize("fields", [
    {"reasoning_content": "I check."}, {"reasoning": "I check."},
    {"reasoning_details": [{"type": "reasoning.text", "text": "I "}, {"type": "reasoning.encrypted", "data": "x"},
                           {"type": "reasoning.text", "text": "check."}]},
])
def test_openai_history_reasoning_in_every_clients_field(fields):
    turn = oa_turn(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **fields}])
    assert turn.messages[1]["reasoning_content"] == "I check."
