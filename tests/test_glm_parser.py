"""Streaming parser: GLM output text -> events, for both layouts, thinking modes, tool calls and bad output."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    coalesce,
)
from glmlocal.glm.parser import StreamParser

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "units": {"enum": ["C", "F"]},
        "detailed": {"type": "boolean"}, "opts": {"type": "object"}, "ids": {"type": "array"},
        "ratio": {"type": "number"}, "maybe": {"type": ["string", "null"]}, "nothing": {"type": "null"},
        "any": {}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}}}}},
]


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse(text, family="glm45", tools=TOOLS, start=False, chunks=None, reason="stop"):
    p = StreamParser(family, tools, starts_in_thinking=start, id_factory=ids())
    events = []
    for piece in (chunks if chunks is not None else [text]):
        events += p.feed(piece)
    return events + p.finish(reason)


def summary(events):
    """(reasoning, content, [(name, args)], finish) of an event stream."""
    return ("".join(e.text for e in events if isinstance(e, ReasoningDelta)),
            "".join(e.text for e in events if isinstance(e, ContentDelta)),
            [(e.name, e.arguments) for e in events if isinstance(e, ToolCallEnd)],
            events[-1].reason)


def check_args_streams(events):
    """Every ended call's argument deltas concatenate to JSON equal to its arguments."""
    streams = {}
    for e in events:
        if isinstance(e, ToolCallArgsDelta):
            streams[e.index] = streams.get(e.index, "") + e.text
        if isinstance(e, ToolCallEnd):
            assert json.loads(streams[e.index]) == e.arguments


G45_CALL = ("\n<think>Need the weather.</think>\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")
G47_CALL = ("Need the weather.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key>"
            "<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>")
PARIS = ("get_weather", {"city": "Paris", "days": 2})

TABLE = {
    "glm45 newline layout": (G45_CALL, "glm45", False, ("Need the weather.", "Let me check.", [PARIS], "tool_calls")),
    "glm47 compact layout, starts in think": (G47_CALL, "glm47", True,
                                              ("Need the weather.", "Let me check.", [PARIS], "tool_calls")),
    "glm47 writes its own <think> anyway": ("<think>" + G47_CALL, "glm47", True,
                                            ("Need the weather.", "Let me check.", [PARIS], "tool_calls")),
    "glm45 layout parsed under glm47": (G45_CALL, "glm47", False,
                                        ("Need the weather.", "Let me check.", [PARIS], "tool_calls")),
    "thinking off (glm45)": ("\nHello there.\n\nSecond paragraph.", "glm45", False,
                             ("", "Hello there.\n\nSecond paragraph.", [], "stop")),
    "thinking off (glm47)": ("Hi!", "glm47", False, ("", "Hi!", [], "stop")),
    "stray </think> never in content": ("</think>Hi", "glm47", False, ("", "Hi", [], "stop")),
    "interleaved thinking": (
        ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\n"
        "<think>Also Rome.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n"
        "</tool_call>"), "glm45", False,
        ("Also Rome.", "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})], "tool_calls")),
    "typed values": (
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>123</arg_value>"
        "<arg_key>days</arg_key><arg_value> 3 </arg_value><arg_key>units</arg_key><arg_value>F</arg_value>"
        "<arg_key>detailed</arg_key><arg_value>true</arg_value><arg_key>opts</arg_key><arg_value>{\"a\": [1, {\"b\": null}]}"
        "</arg_value><arg_key>ids</arg_key><arg_value>[1,2]</arg_value><arg_key>ratio</arg_key><arg_value>0.5</arg_value>"
        "<arg_key>maybe</arg_key><arg_value>null</arg_value><arg_key>nothing</arg_key><arg_value>null</arg_value>"
        "<arg_key>any</arg_key><arg_value>7</arg_value></tool_call>"), "glm47", False,
        ("", "", [("get_weather", {"city": "123", "days": 3, "units": "F", "detailed": True,
                                   "opts": {"a": [1, {"b": None}]}, "ids": [1, 2], "ratio": 0.5, "maybe": "null",
                                   "nothing": None, "any": 7})], "tool_calls")),
    "invalid JSON for a typed value falls back to the raw string": (
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>X</arg_value><arg_key>days</arg_key>"
        "<arg_value>three</arg_value></tool_call>"), "glm47", False,
        ("", "", [("get_weather", {"city": "X", "days": "three"})], "tool_calls")),
    "strings raw: newlines, quotes, tags, entities kept": (
        ("<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>a.html</arg_value>\n<arg_key>content</arg_key>\n"
        "<arg_value><p class=\"x\">a &lt; b</p>\n\tdone\\n <tool_call></arg_value>\n</tool_call>"), "glm45", False,
        ("", "", [("write_file", {"path": "a.html", "content": "<p class=\"x\">a &lt; b</p>\n\tdone\\n <tool_call>"})],
         "tool_calls")),
    "unknown tool is still a call": (
        ("<tool_call>rm_rf<arg_key>path</arg_key><arg_value>/</arg_value><arg_key>n</arg_key><arg_value>5</arg_value>"
        "</tool_call>"), "glm47", False, ("", "", [("rm_rf", {"path": "/", "n": 5})], "tool_calls")),
    "call without arguments": ("<tool_call>get_time</tool_call>", "glm47", False,
                               ("", "", [("get_time", {})], "tool_calls")),
    "JSON-style call": ('\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}</tool_call>',
                        "glm45", False, ("", "", [("get_weather", {"city": "Oslo", "days": 1})], "tool_calls")),
    "JSON-style call with string arguments": (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', "glm45", False,
        ("", "", [("get_weather", {"city": "Oslo"})], "tool_calls")),
    "name then JSON arguments": ('<tool_call>get_weather\n{"city": "Oslo"}\n</tool_call>', "glm45", False,
                                 ("", "", [("get_weather", {"city": "Oslo"})], "tool_calls")),
    "garbage JSON call is shown, not executed": ("<tool_call>{oops}</tool_call>", "glm45", False,
                                                 ("", "<tool_call>{oops}</tool_call>", [], "stop")),
    "end tokens are never content": ("Done.\n<|user|>\nnext user turn", "glm45", False, ("", "Done.", [], "stop")),
    "observation ends the turn after a call": (
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call><|observation|>junk",
        "glm47", False, ("", "", [("get_weather", {"city": "Oslo"})], "tool_calls")),
    "model forgets </tool_call> but stops cleanly": (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n", "glm45", False,
        ("", "", [("get_weather", {"city": "Oslo"})], "tool_calls")),
    "tool_call inside unclosed reasoning closes it": (
        "Let me call.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>",
        "glm47", True, ("Let me call.", "", [("get_weather", {"city": "Oslo"})], "tool_calls")),
    "skipped thinking: unclosed think block becomes the answer": (
        "The answer is 4.", "glm47", True, ("The answer is 4.", "The answer is 4.", [], "stop")),
    "a lone < and non-tags are content": ("a < b and <b>bold</b> <thinking", "glm47", False,
                                          ("", "a < b and <b>bold</b> <thinking", [], "stop")),
    "output ending in a lone < keeps it, a partial end token is dropped": (
        "x <", "glm47", False, ("", "x <", [], "stop")),
    "partial end token at the end is dropped": ("x<|obs", "glm47", False, ("", "x", [], "stop")),
    "text after calls is content": (
        "<tool_call>get_time</tool_call>\nDone calling.", "glm45", False,
        ("", "Done calling.", [("get_time", {})], "tool_calls")),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_parser_table(name):
    text, family, start, want = TABLE[name]
    events = parse(text, family, start=start)
    assert summary(events) == want
    check_args_streams(events)
    # byte-at-a-time gives the same result
    assert coalesce(parse(text, family, start=start, chunks=list(text))) == coalesce(events)


def test_no_tools_declared_leaves_xml_as_content():
    text = "Sure.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
    assert summary(parse(text, tools=None)) == ("", text, [], "stop")


def test_truncated_call_is_never_committed():
    cut = "Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    events = parse(cut, "glm47", reason="length")
    assert summary(events) == ("", "Checking.", [], "length")
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.name for s in starts] == ["get_weather"]  # streamed as it arrived ...
    assert not any(isinstance(e, ToolCallEnd) for e in events)  # ... but never committed
    # the complete first call survives, the cut second one does not
    two = G47_CALL + "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome"
    assert summary(parse(two, "glm47", start=True, reason="length"))[2:] == ([PARIS], "length")
    # even a clean boundary is not enough when the cut came from max tokens
    boundary = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
    assert summary(parse(boundary, "glm47", reason="length"))[2] == []
    assert summary(parse(boundary, "glm47", reason="cancelled"))[3] == "cancelled"


def test_streaming_shape_of_a_call():
    text = "<tool_call>write_file<arg_key>content</arg_key><arg_value>line1\nline2</arg_value></tool_call>"
    chunks = ["<tool_", "call>write", "_file<arg_key>cont", "ent</arg_key><arg_value>line1", "\nli", "ne2</arg_va",
              "lue></tool_call>"]
    events = parse(text, "glm47", chunks=chunks)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ToolCallStart" and kinds[-2:] == ["ToolCallEnd", "Finish"]
    deltas = [e.text for e in events if isinstance(e, ToolCallArgsDelta)]
    assert deltas == ['{"content": ', '"', "line1", "\\nli", "ne2", '"', "}"]  # strings stream incrementally
    assert events[0] == ToolCallStart(0, "call_0", "write_file")


def test_hold_back_only_possible_tags():
    p = StreamParser("glm47", TOOLS, starts_in_thinking=False)
    assert p.feed("Hello <t") == [ContentDelta("Hello")]  # "<t" may be <think> or <tool_call>; " " may trail
    assert p.feed("x") == [ContentDelta(" <tx")]
    assert p.feed(" <|us") == []
    assert p.feed("er|>") == []
    assert p.finish("stop") == [Finish("stop")]


def test_real_ids_and_finish_once():
    p = StreamParser("glm47", TOOLS, starts_in_thinking=False)
    events = p.feed("<tool_call>get_time</tool_call>") + p.finish()
    start = events[0]
    assert start.id.startswith("call_") and len(start.id) == 29 and events[-2].id == start.id
    assert p.finish() == [] and p.feed("more") == []


# ---------------------------------------------------------------- chunking property

FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
             "</arg_value>", "get_weather", "write_file", "city", "days", "content", "Paris", "12", "{\"a\": 1}",
             "\n", " ", "  \n", "text", "<", ">", "</", "<|user|>", "&lt;", "é✓", "{", "}", "<|observation|>", "<t"]
SAMPLES = [G45_CALL, G47_CALL, TABLE["typed values"][0], TABLE["strings raw: newlines, quotes, tags, entities kept"][0],
           TABLE["interleaved thinking"][0], TABLE["JSON-style call"][0]]


def _split(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.sampled_from(SAMPLES), st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=25),
       family=st.sampled_from(["glm45", "glm47"]), start=st.booleans(),
       reason=st.sampled_from(["stop", "length"]), with_tools=st.booleans())
def test_every_chunking_gives_the_same_events(text, cuts, family, start, reason, with_tools):
    tools = TOOLS if with_tools else None
    whole = parse(text, family, tools, start, reason=reason)
    pieces = parse(text, family, tools, start, chunks=_split(text, cuts), reason=reason)
    assert coalesce(pieces) == coalesce(whole)
    check_args_streams(whole)
    assert isinstance(whole[-1], Finish) and sum(isinstance(e, Finish) for e in whole) == 1
    for e in whole:  # tags never leak into reasoning or content when tools are declared
        if isinstance(e, (ReasoningDelta, ContentDelta)):
            assert "<think>" not in e.text and "</think>" not in e.text and "<|user|>" not in e.text


# ---------------------------------------------------------------- render -> parse round trip

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
RAW_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: "</arg_value>" not in s)


@settings(max_examples=150, deadline=None)
@given(path=RAW_TEXT, content=RAW_TEXT, opts=JSON_VALUES.filter(lambda v: not isinstance(v, str)), family=st.sampled_from(["glm45", "glm47"]),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_rendered_calls_parse_back_to_the_same_arguments(path, content, opts, family, cuts):
    """What the template writes for a call (strings raw, other values JSON) parses back to the same arguments.

    (A bare string for a non-string parameter is ambiguous in GLM's format - "123" - and schema-invalid anyway.)
    """
    from glmlocal.glm.template import ChatTemplate

    tools = [{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}, "opts": {"type": ["object", "array", "number",
                                                                                  "boolean", "null"]}}}}}]
    args = {"path": path, "content": content, "opts": opts}
    tpl = ChatTemplate.builtin(family)
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "write_file", "arguments": args}}]}]
    prompt = tpl.render(msgs, tools, add_generation_prompt=False, enable_thinking=False)
    reply = prompt.split("<|assistant|>", 1)[1]  # as the model would have written it after the prompt
    reply = reply.replace("\n<think></think>", "", 1) if family == "glm45" else reply.replace("</think>", "", 1)
    events = parse(reply, family, tools, chunks=_split(reply, cuts))
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [(e.name, e.arguments) for e in ends] == [("write_file", args)]
    check_args_streams(events)
