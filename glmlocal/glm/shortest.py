"""How many tokens the shortest output of a forced grammar (glm/tools.py) can take: the room a forced tool call
or JSON answer needs after thinking, so the session can cap thinking to leave it (engine/session.py).

The count is an upper bound over every tokenization of the shortest valid text, not the tokenizer's own split:
a model may spell any text in single-byte tokens (small, quantized or confused ones do), so each UTF-8 byte of
plain text counts as one token. The markup tags are single tokens, because the grammar names them as tokens.
The shortest valid text is the grammar's: the call to the forced function with only its required arguments,
each at its shortest value (a string's shortest enum literal or minLength characters, JSON's shortest value for
its schema as llama-cpp-python's converter constrains it), in the family's layout with every optional newline
written. Regex patterns are estimated (their own length), not solved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from glmlocal.glm import schema as sch
from glmlocal.glm.parser import (
    CALL_CLOSE,
    CALL_OPEN,
    KEY_CLOSE,
    KEY_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    VAL_CLOSE,
    VAL_OPEN,
)
from glmlocal.glm.tools import MAX_BOUNDED_LENGTH, ToolChoice, chosen_functions

_TAGS = (CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VAL_OPEN, VAL_CLOSE, THINK_OPEN, THINK_CLOSE)
_FORMAT_LENGTH = {"date": 12, "time": 11, "date-time": 22, "uuid": 38}  # quoted, shortest forms


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def shortest_json(schema: object, root: object = None, depth: int = 0) -> str:
    """The shortest JSON text the converter's grammar accepts for `schema` (compact: no optional spaces)."""
    schema = sch.resolve_ref(schema, root)
    if not isinstance(schema, Mapping) or depth > 12:
        return "{}"
    pick = lambda texts: min(texts, key=_bytes) if texts else "{}"  # noqa: E731
    branches = schema.get("oneOf") or schema.get("anyOf")
    if isinstance(branches, list):
        return pick([shortest_json(b, root, depth + 1) for b in branches])
    kind = schema.get("type")
    if isinstance(kind, list):
        return pick([shortest_json({**schema, "type": t}, root, depth + 1) for t in kind])
    if "const" in schema:
        return json.dumps(schema["const"], ensure_ascii=False)
    if isinstance(schema.get("enum"), list):
        return pick([json.dumps(v, ensure_ascii=False) for v in schema["enum"]])
    if kind in (None, "object") and ("properties" in schema or "allOf" in schema):
        return _shortest_object(schema, root, depth)
    if kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
        items = schema.get("items") or schema.get("prefixItems")
        parts = ([shortest_json(i, root, depth + 1) for i in items] if isinstance(items, list)
                 else [shortest_json(items, root, depth + 1)] * int(schema.get("minItems", 0) or 0))
        return "[" + ",".join(parts) + "]"
    return _shortest_scalar(schema, kind)


def _shortest_object(schema: Mapping[str, object], root: object, depth: int) -> str:
    props = dict(schema.get("properties") or {})
    required = [k for k in schema.get("required") or [] if k in props]
    for part in schema.get("allOf") or []:  # the converter requires the properties of allOf's plain parts
        part = sch.resolve_ref(part, root)
        if isinstance(part, Mapping) and "anyOf" not in part and isinstance(part.get("properties"), Mapping):
            props.update(part["properties"])
            required += [k for k in part["properties"] if k not in required]
    pairs = [f"{json.dumps(k, ensure_ascii=False)}:{shortest_json(props[k], root, depth + 1)}" for k in required]
    return "{" + ",".join(pairs) + "}"


def _shortest_scalar(schema: Mapping[str, object], kind: object) -> str:
    fmt = str(schema.get("format") or "")
    if kind in (None, "string") and "pattern" in schema:
        return '"' + "a" * len(str(schema["pattern"])) + '"'
    if kind in (None, "string") and (fmt.startswith("uuid") or fmt in _FORMAT_LENGTH):
        return '"' + "0" * (_FORMAT_LENGTH["uuid" if fmt.startswith("uuid") else fmt] - 2) + '"'
    if kind == "string":
        return '"' + "a" * int(schema.get("minLength", 0) or 0) + '"'
    return {"boolean": "true", "null": "null", "integer": "0", "number": "0"}.get(str(kind), "{}")


def shortest_value(prop: object, root: object) -> str:
    """The shortest text an argument's value may be in a forced call (glm/tools.py `_arg_rule`)."""
    mode = sch.value_mode(prop, root)
    if mode == "json":
        return shortest_json(prop, root)
    resolved = sch.resolve_ref(prop, root)
    if mode == "string" and isinstance(resolved, Mapping):
        values = resolved.get("enum") if "enum" in resolved else (
            [resolved["const"]] if "const" in resolved else None)
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            return min(values, key=_bytes)
        hi = resolved.get("maxLength")
        if isinstance(hi, int) and 0 <= hi <= MAX_BOUNDED_LENGTH:
            return "a" * min(int(resolved.get("minLength", 0) or 0), hi)
    return ""  # free text may be empty


def shortest_call(fn: Mapping[str, object], family: str) -> str:
    """The shortest call to `fn` that the forced-call grammar accepts, in the family's layout."""
    params = fn.get("parameters") if isinstance(fn.get("parameters"), Mapping) else {}
    props = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
    required = [k for k in (params.get("required") or []) if k in props]
    nl = "\n" if family == "glm45" else ""
    args = "".join(f"{KEY_OPEN}{k}{KEY_CLOSE}{nl}{VAL_OPEN}{shortest_value(props[k], params)}{VAL_CLOSE}{nl}"
                   for k in required)
    return f"{CALL_OPEN}{fn.get('name', '')}{nl}{args}{CALL_CLOSE}"


def worst_case_tokens(text: str) -> int:
    """Most tokens `text` can take: one per markup tag, one per UTF-8 byte of everything else."""
    pattern = "|".join(re.escape(t) for t in _TAGS)
    return len(re.findall(pattern, text)) + _bytes(re.sub(pattern, "", text))


def shortest_call_tokens(fn: Mapping[str, object], family: str) -> int:
    """Most tokens the shortest valid call to `fn` can take (see the module docstring)."""
    return worst_case_tokens(shortest_call(fn, family))


def forced_call_tokens(tools: list[Mapping[str, object]] | None, tool_choice: ToolChoice, family: str, *,
                       enable_thinking: bool) -> int | None:
    """Tokens a forced call needs once thinking is over: the longest of the forced tools' shortest calls (the
    model picks the tool, so every pick must fit), the layout's optional newlines outside the think block, and
    the end-of-generation token. None when tool_choice forces nothing."""
    fns = chosen_functions(tools, tool_choice)
    if fns is None:
        return None
    layout = (2 if enable_thinking else 1) if family == "glm45" else 0  # "\n"? [<think>...</think> "\n"?]
    return max(shortest_call_tokens(fn, family) for fn in fns) + layout + 1


def forced_json_tokens(schema: Mapping[str, object] | None, family: str, *, enable_thinking: bool) -> int:
    """Tokens a forced JSON answer (response_format) needs once thinking is over, the end token included."""
    target = schema if isinstance(schema, Mapping) and schema else {"type": "object"}
    layout = (2 if enable_thinking else 1) if family == "glm45" else 0
    return _bytes(shortest_json(target, target)) + layout + 1
