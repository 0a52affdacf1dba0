"""Typing GLM tool-call argument values by the tool's JSON schema.

GLM writes every argument as text inside <arg_value>...</arg_value>: strings raw (real newlines, no quotes,
no XML escaping, because the template renders them that way), everything else as JSON. So the type comes from
the schema, not from the text (as llama.cpp and Ollama do): a parameter that may be a string keeps its raw
text ("123" stays "123"); any other parameter is parsed as JSON, falling back to the raw string when the model
wrote invalid JSON. Without a schema (unknown tool or argument) the text is parsed as JSON when that yields a
non-string, else kept raw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

ValueMode = Literal["string", "json", "guess"]


def function_of(tool: Mapping[str, object]) -> Mapping[str, object]:
    """The function object of an OpenAI-format tool (or the tool itself when given bare)."""
    fn = tool.get("function")
    return fn if isinstance(fn, Mapping) else tool


def tool_index(tools: list[Mapping[str, object]] | None) -> dict[str, Mapping[str, object]]:
    """name -> parameters schema, for the tools a request declared."""
    out: dict[str, Mapping[str, object]] = {}
    for tool in tools or []:
        fn = function_of(tool)
        if isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, Mapping) else {}
    return out


def resolve_ref(schema: object, root: object, depth: int = 0) -> object:
    """Follow a local "$ref" ("#/$defs/Name") against `root`; anything unresolvable is returned unchanged."""
    ref = schema.get("$ref") if isinstance(schema, Mapping) else None
    if not isinstance(ref, str) or "#/" not in ref or depth > 16:
        return schema
    target = root
    for part in ref.split("#", 1)[1][1:].split("/"):
        if not isinstance(target, Mapping) or part not in target:
            return schema
        target = target[part]
    return resolve_ref(target, root, depth + 1)


def value_mode(schema: object, root: object = None) -> ValueMode:
    """How to read a value for this parameter schema (`root`: the parameters schema, for local $refs)."""
    schema = resolve_ref(schema, root)
    if not isinstance(schema, Mapping):
        return "guess"
    typ = schema.get("type")
    if isinstance(typ, str):
        return "string" if typ == "string" else "json"
    if isinstance(typ, list) and typ:
        return "string" if "string" in typ else "json"
    for key in ("enum", "const"):
        if key in schema:
            values = schema[key] if key == "enum" else [schema[key]]
            if isinstance(values, list) and values:
                return "string" if any(isinstance(v, str) for v in values) else "json"
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list) and branches:
        modes = {value_mode(b, root) for b in branches}
        if "string" in modes:
            return "string"
        return "json" if modes == {"json"} else "guess"
    if "properties" in schema or "items" in schema:
        return "json"
    return "guess"


def param_mode(params: Mapping[str, object] | None, key: str) -> ValueMode:
    """Mode for argument `key` of a tool whose parameters schema is `params` (None: unknown tool)."""
    if not isinstance(params, Mapping):
        return "guess"
    props = params.get("properties")
    if not isinstance(props, Mapping) or key not in props:
        return "guess"
    return value_mode(props[key], params)


def convert_value(raw: str, mode: ValueMode) -> object:
    """The typed value of an <arg_value> text."""
    if mode == "string":
        return raw
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return raw
    if mode == "guess" and isinstance(value, str):
        return raw
    return value
