"""Tool schemas -> value typing and GBNF text (structure and error handling; llama.cpp checks are in
tests/test_grammar_e2e.py)."""

from __future__ import annotations

import pytest

from glmlocal.errors import InputError
from glmlocal.glm.schema import convert_value, param_mode, value_mode
from glmlocal.glm.tools import (
    chosen_functions,
    gbnf_literal,
    json_schema_grammar,
    tool_call_grammar,
)

pytest.importorskip("llama_cpp")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "units": {"enum": ["C", "F"]}}, "required": ["city"]}}}
NOTE = {"type": "function", "function": {"name": "add_note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 5}}}}}


@pytest.mark.parametrize("schema,mode", [
    ({"type": "string"}, "string"), ({"type": "integer"}, "json"), ({"type": ["string", "null"]}, "string"),
    ({"type": ["integer", "null"]}, "json"), ({"enum": ["a", "b"]}, "string"), ({"enum": [1, 2]}, "json"),
    ({"const": True}, "json"), ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "string"),
    ({"anyOf": [{"type": "number"}, {"type": "array"}]}, "json"), ({"properties": {}}, "json"),
    ({}, "guess"), ({"$ref": "#/defs/x"}, "guess"), (None, "guess"),
])
def test_value_mode(schema, mode):
    assert value_mode(schema) == mode


@pytest.mark.parametrize("raw,mode,value", [
    ("123", "string", "123"), ("123", "json", 123), ("1.5e2", "json", 150.0), ("true", "json", True),
    ("null", "json", None), ('{"a": [1]}', "json", {"a": [1]}), ("three", "json", "three"),
    ("  7 ", "json", 7), ("42", "guess", 42), ('"quoted"', "guess", '"quoted"'), ("plain", "guess", "plain"),
    ("[1, 2", "json", "[1, 2"),
])
def test_convert_value(raw, mode, value):
    assert convert_value(raw, mode) == value


def test_param_mode_lookup():
    params = WEATHER["function"]["parameters"]
    assert (param_mode(params, "city"), param_mode(params, "days"), param_mode(params, "nope")) == \
        ("string", "json", "guess")
    assert param_mode(None, "city") == "guess"


def test_auto_and_none_mean_no_grammar():
    assert tool_call_grammar([WEATHER], "glm45", "auto") is None
    assert tool_call_grammar([WEATHER], "glm45", "none") is None
    assert tool_call_grammar(None, "glm47", None) is None


def test_tool_choice_resolution_and_errors():
    assert [f["name"] for f in chosen_functions([WEATHER, NOTE], "required")] == ["get_weather", "add_note"]
    assert [f["name"] for f in chosen_functions([WEATHER, NOTE], {"type": "function",
                                                                   "function": {"name": "add_note"}})] == ["add_note"]
    assert [f["name"] for f in chosen_functions([WEATHER, NOTE], {"type": "tool", "name": "add_note"})] == ["add_note"]
    with pytest.raises(InputError, match="not among the tools"):
        tool_call_grammar([WEATHER], "glm45", {"type": "function", "function": {"name": "launch"}})
    with pytest.raises(InputError, match="at least one tool"):
        tool_call_grammar([], "glm45", "required")
    with pytest.raises(InputError, match="unsupported tool_choice"):
        tool_call_grammar([WEATHER], "glm45", 7)


def test_grammar_layouts_per_family():
    g45 = tool_call_grammar([WEATHER], "glm45", "required", enable_thinking=False)
    g47 = tool_call_grammar([WEATHER], "glm47", "required", enable_thinking=False)
    # the tags are token references (single special tokens), the text between them literals
    assert '<tool_call> "get_weather\\n"' in g45 and '<arg_key> "city" </arg_key> "\\n" <arg_value>' in g45
    assert '<tool_call> "get_weather"' in g47 and '<arg_key> "city" </arg_key> <arg_value>' in g47
    # required argument is mandatory, optional ones carry "?"
    call = next(line for line in g47.splitlines() if line.startswith("glm-call"))
    assert call.count("?") == 2 and call.endswith(" </tool_call>")
    assert '"C" | "F"' in g47  # string enum values are raw literals, not JSON-quoted


def test_think_prefix_per_family_and_mode():
    on45 = tool_call_grammar([WEATHER], "glm45", "required", enable_thinking=True)
    pre45 = next(line for line in on45.splitlines() if line.startswith("glm-pre"))
    assert pre45.endswith('::= "\\n"? (<think> glm-not-1-0 </think> "\\n"?)?')  # GLM-4.5 may skip the block
    on47 = tool_call_grammar([WEATHER], "glm47", "required", enable_thinking=True)
    pre47 = next(line for line in on47.splitlines() if line.startswith("glm-pre"))
    assert pre47.endswith("::= glm-not-1-0 </think>")  # the prompt opened it; no character cap any more
    off47 = tool_call_grammar([WEATHER], "glm47", "required", enable_thinking=False)
    assert "think" not in off47


def test_bounded_strings_and_json_grammar():
    g = tool_call_grammar([NOTE], "glm47", "required", enable_thinking=False)
    assert "[^<]{0,5}" in g
    any_obj = json_schema_grammar(None)
    assert any_obj.startswith("root ::= ") and "object ::=" in any_obj
    typed = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    assert '"\\"n\\""' in typed or 'n\\"' in typed
    with pytest.raises(InputError, match="unsupported JSON schema"):
        json_schema_grammar({"type": "frobnicate"})


def test_gbnf_literal_escapes():
    assert gbnf_literal('a"b\\c\nd\te') == '"a\\"b\\\\c\\nd\\te"'
    assert gbnf_literal("é✓") == '"é✓"'


PYDANTIC_STYLE = [  # two tools that both define "#/$defs/Item", differently
    {"type": "function", "function": {"name": "order", "parameters": {
        "type": "object", "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "integer"}},
                                             "required": ["sku"]},
                                    "Color": {"enum": ["red", "blue"]}},
        "properties": {"item": {"$ref": "#/$defs/Item"}, "color": {"$ref": "#/$defs/Color"}},
        "required": ["item", "color"]}}},
    {"type": "function", "function": {"name": "label", "parameters": {
        "type": "object", "$defs": {"Item": {"type": "string", "maxLength": 3}},
        "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"]}}},
]


def test_local_refs_are_followed_per_tool():
    order = PYDANTIC_STYLE[0]["function"]["parameters"]
    assert param_mode(order, "color") == "string" and param_mode(order, "item") == "json"
    g = tool_call_grammar(PYDANTIC_STYLE, "glm47", "required", enable_thinking=False)
    assert '"red" | "blue"' in g and "[^<]{0,3}" in g  # string $refs are raw text rules
    assert "sku" in g
