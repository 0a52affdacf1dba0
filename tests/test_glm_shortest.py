"""The shortest output of a forced grammar, in tokens (glm/shortest.py): pure tables here; that llama.cpp's
grammar accepts exactly these shortest texts is checked in tests/test_grammar_e2e.py."""

from __future__ import annotations

import pytest

from glmlocal.glm.shortest import (
    forced_call_tokens,
    forced_json_tokens,
    shortest_call,
    shortest_json,
    worst_case_tokens,
)
from tests.test_glm_tools import NOTE, PYDANTIC_STYLE, WEATHER

SWITCH = {"type": "function", "function": {"name": "switch", "parameters": {"type": "object", "properties": {
    "mode": {"enum": ["fast", "slow", "eco"]}, "on": {"type": "boolean"}}, "required": ["mode", "on"]}}}


@pytest.mark.parametrize("schema,text", [
    ({"type": "integer"}, "0"), ({"type": "number"}, "0"), ({"type": "boolean"}, "true"), ({"type": "null"}, "null"),
    ({"type": "string"}, '""'), ({"type": "string", "minLength": 3}, '"aaa"'), ({"type": "object"}, "{}"),
    ({}, "{}"), ({"enum": [10, 2, "abc"]}, "2"), ({"const": "x"}, '"x"'), ({"type": ["integer", "null"]}, "0"),
    ({"anyOf": [{"type": "string", "minLength": 4}, {"type": "boolean"}]}, "true"),
    ({"type": "array", "items": {"type": "integer"}}, "[]"),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 2}, "[true,true]"),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, '[0,""]'),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]},
     '{"a":0}'),
    ({"allOf": [{"properties": {"x": {"type": "null"}}}]}, '{"x":null}'),
    ({"type": "string", "format": "date"}, '"0000000000"'), ({"type": "string", "pattern": "^[a-z]+$"}, '"aaaaaaaa"'),
    ({"type": "string", "format": "uuid"}, '"' + "0" * 36 + '"'),
])
def test_shortest_json_per_schema(schema, text):
    assert shortest_json(schema, schema) == text


def test_shortest_call_per_family_and_refs():
    assert shortest_call(SWITCH["function"], "glm47") == (
        "<tool_call>switch<arg_key>mode</arg_key><arg_value>eco</arg_value>"
        "<arg_key>on</arg_key><arg_value>true</arg_value></tool_call>")
    assert shortest_call(WEATHER["function"], "glm45") == (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value></arg_value>\n</tool_call>")
    assert shortest_call(NOTE["function"], "glm47") == "<tool_call>add_note</tool_call>"  # nothing required
    order = shortest_call(PYDANTIC_STYLE[0]["function"], "glm47")  # $refs followed: a JSON object, an enum
    assert '<arg_value>{"sku":0}</arg_value>' in order and "<arg_value>red</arg_value>" in order


def test_worst_case_counts_tags_as_one_token_and_text_by_the_byte():
    assert worst_case_tokens("<tool_call>ab</tool_call>") == 4
    assert worst_case_tokens("<arg_value>é</arg_value>\n") == 5  # "é" is two bytes: two byte tokens at worst
    # 1 + 6 ("switch") + 2 args x (4 tags + key + value) + 1
    assert worst_case_tokens(shortest_call(SWITCH["function"], "glm47")) == 1 + 6 + (4 + 4 + 3) + (4 + 2 + 4) + 1


def test_forced_room_takes_the_longest_forced_tool_the_layout_and_the_end_token():
    calls = {f: worst_case_tokens(shortest_call(SWITCH["function"], f)) for f in ("glm45", "glm47")}
    assert forced_call_tokens([SWITCH], "required", "glm47", enable_thinking=True) == calls["glm47"] + 1
    assert forced_call_tokens([SWITCH], "required", "glm45", enable_thinking=True) == calls["glm45"] + 2 + 1
    assert forced_call_tokens([SWITCH], "required", "glm45", enable_thinking=False) == calls["glm45"] + 1 + 1
    both = forced_call_tokens([SWITCH, NOTE], "required", "glm47", enable_thinking=True)
    named = forced_call_tokens([SWITCH, NOTE], {"type": "function", "function": {"name": "add_note"}}, "glm47",
                               enable_thinking=True)
    assert both == calls["glm47"] + 1 and named == worst_case_tokens("<tool_call>add_note</tool_call>") + 1
    assert forced_call_tokens([SWITCH], "auto", "glm47", enable_thinking=True) is None
    assert forced_json_tokens(None, "glm47", enable_thinking=True) == 3  # "{}" and the end token
