"""OpenAI Responses API requests (POST /v1/responses): the body, and its translation into a TurnRequest.

Pure translation, no I/O. Codex CLI (`wire_api = "responses"`) and other newer agents speak this API. The
server is stateless: the client resends the whole conversation as `input` items each turn (as Codex does with
`store = false`), `store` is ignored and `previous_response_id` / `item_reference` are refused with a 400.
Only function tools run here (a `namespace`'s functions are flattened in, and their calls carry `namespace`);
OpenAI's hosted tools (web_search, file_search, ...) and custom/local_shell tools are dropped from the prompt
(`ignored_tools` names them; the app logs it once). Reasoning items sent back are read from their content,
their summary, or our `encrypted_content` blob (`encode_reasoning`; base64, not encrypted: a local server).
The response side (the Response object and its stream events) is glmlocal.server.responses.
"""

from __future__ import annotations

import base64
import binascii
import json

from pydantic import BaseModel, ConfigDict, Field

from glmlocal.glm.tools import ToolChoice
from glmlocal.server.errors import APIError
from glmlocal.server.openai import arguments_dict, text_of
from glmlocal.server.thinking import Effort, ThinkingPolicy, openai_thinking
from glmlocal.server.types import TurnRequest

ENCRYPTED_PREFIX = "glmlocal.v1:"
STATELESS = ("this server is stateless: send the whole conversation in `input` (with store=false) instead of "
             "{what}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ReasoningConfig(_Body):
    effort: Effort | None = None
    summary: str | None = None


class TextConfig(_Body):
    format: dict[str, object] | None = None


class ResponsesRequest(_Body):
    """POST /v1/responses body (the fields glmlocal honours; others - store, metadata, user, truncation,
    prompt_cache_key, service_tier - are accepted and ignored)."""

    model: str | None = None
    input: str | list[object] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, object]] | None = None
    tool_choice: str | dict[str, object] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    seed: int | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    include: list[str] | None = None
    chat_template_kwargs: dict[str, object] | None = None  # as on the chat route: enable_thinking, thinking_budget,
    # clear_thinking


def _bad(message: str, param: str = "input") -> APIError:
    return APIError(400, message, param=param)


def encode_reasoning(text: str) -> str:
    return ENCRYPTED_PREFIX + base64.b64encode(text.encode()).decode()


def _decode_reasoning(blob: object) -> str:
    if not isinstance(blob, str) or not blob.startswith(ENCRYPTED_PREFIX):
        return ""  # another server's opaque blob: nothing we can read
    try:
        return base64.b64decode(blob[len(ENCRYPTED_PREFIX):], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""


def _text(value: object) -> str:
    """Content (a string, or a list of parts) as text; refusal parts count as text; other values as JSON."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        return json.dumps(value, ensure_ascii=False)
    parts = [{"type": "text", "text": p.get("refusal") or p.get("text")}
             if isinstance(p, dict) and p.get("type") == "refusal" else p for p in value]
    return text_of([p for p in parts if isinstance(p, (dict, str))])


def reasoning_text(item: dict) -> str:
    """The readable thinking of a reasoning item sent back: its content, else its summary, else our blob."""
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key) if isinstance(item.get(key), list) else []
        texts = [str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type", kind) == kind]
        if any(texts):
            return "\n".join(t for t in texts if t)
    return _decode_reasoning(item.get("encrypted_content"))


class _History:
    """Builds the OpenAI-shaped message list from Responses input items, merging one earlier response's
    reasoning / message / function_call items back into one assistant message (as GLM's template wants)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.reasoning: str | None = None  # from a reasoning item, waiting for its assistant message
        self.open = False  # the last message is an assistant turn that later items of the same turn extend

    def _assistant(self, *, new: bool) -> dict:
        if self.open and not new:
            return self.messages[-1]
        msg: dict[str, object] = {"role": "assistant", "content": ""}
        if self.reasoning is not None:
            msg["reasoning_content"], self.reasoning = self.reasoning, None
        self.messages.append(msg)
        self.open = True
        return msg

    def _other(self, msg: dict) -> None:
        self.messages.append(msg)
        self.open, self.reasoning = False, None  # a reasoning item not followed by its answer is dropped

    def add(self, i: int, item: object) -> None:
        if not isinstance(item, dict):
            raise _bad(f"input[{i}] must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            self._message(i, item)
        elif kind == "function_call":
            self._call(i, item)
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise _bad(f"input[{i}]: function_call_output needs a call_id")
            self._other({"role": "tool", "tool_call_id": str(item["call_id"]), "content": _text(item.get("output"))})
        elif kind == "reasoning":
            self.open, self.reasoning = False, reasoning_text(item) or None  # unreadable: as if absent
        elif kind == "item_reference":
            raise _bad(f"input[{i}]: " + STATELESS.format(what="item references"))
        else:
            raise _bad(f"input[{i}]: input item type {kind!r} is not supported here (messages, function_call, "
                       "function_call_output and reasoning items are)")

    def _message(self, i: int, item: dict) -> None:
        role, content = item.get("role"), item.get("content")
        if role not in ("user", "system", "developer", "assistant"):
            raise _bad(f"input[{i}]: message role {role!r} is not one of user, system, developer, assistant")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad(f"input[{i}]: message content must be a string or a list of content parts")
        if isinstance(content, list) and any(not isinstance(p, dict) for p in content):
            raise _bad(f"input[{i}]: each content part must be an object")
        text = _text(content)
        if role == "assistant":
            msg = self._assistant(new=True)
            msg["content"] = text
        else:
            self._other({"role": "system" if role == "developer" else role, "content": text})

    def _call(self, i: int, item: dict) -> None:
        if not item.get("name") or not item.get("call_id"):
            raise _bad(f"input[{i}]: function_call needs a name and a call_id")
        if not isinstance(item.get("arguments"), (str, dict, type(None))):
            raise _bad(f"input[{i}]: function_call arguments must be a JSON string")
        msg = self._assistant(new=False)
        msg.setdefault("tool_calls", []).append(
            {"id": str(item["call_id"]), "type": "function",
             "function": {"name": str(item["name"]), "arguments": arguments_dict(item.get("arguments"))}})


def input_messages(body: ResponsesRequest) -> list[dict]:
    """`instructions` + `input` as the OpenAI-shaped messages GLM's template reads (raises APIError 400)."""
    history = _History()
    if body.instructions:
        history._other({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        history._other({"role": "user", "content": body.input})
    else:
        for i, item in enumerate(body.input):
            history.add(i, item)
    return history.messages


def _function(i: int, t: dict) -> dict:
    if not isinstance(t.get("name"), str) or not t["name"]:
        raise _bad(f"tools[{i}]: a function tool needs a name", "tools")
    if not isinstance(t.get("parameters"), (dict, type(None))):
        raise _bad(f"tools[{i}]: parameters must be a JSON schema object", "tools")
    fn = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
    if t.get("description"):
        fn["description"] = str(t["description"])
    return {"type": "function", "function": fn}


def _function_tools(tools: list[dict] | None) -> tuple[list[dict], list[str], dict[str, str]]:
    """Function tools (a namespace's functions flattened in: Codex groups some that way) as OpenAI chat
    tool dicts; the names of the tools dropped; function name -> namespace for the calls we answer."""
    out, ignored, namespaces = [], [], {}
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            raise _bad(f"tools[{i}] must be an object", "tools")
        if t.get("type") == "function":
            out.append(_function(i, t))
        elif t.get("type") == "namespace" and isinstance(t.get("tools"), list):
            inner, dropped, _ = _function_tools(t["tools"])
            out += inner
            ignored += dropped
            namespaces.update({f["function"]["name"]: str(t.get("name") or "") for f in inner})
        else:
            ignored.append(str(t.get("name") or t.get("type")))
    names = [f["function"]["name"] for f in out]
    if len(set(names)) != len(names):
        raise _bad(f"tools: function names must be unique (namespaces included): {names}", "tools")
    return out, ignored, namespaces


def ignored_tools(body: ResponsesRequest) -> list[str]:
    """Names (or types) of the non-function tools in the request, which this server cannot run."""
    return _function_tools(body.tools)[1]


def _tool_choice(choice: str | dict | None, tools: list[dict]) -> ToolChoice:
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return "none"
    if not tools and choice == "required":
        raise _bad("tool_choice 'required' needs at least one function tool", "tool_choice")
    if choice == "required":
        return "required"
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str) or choice["name"] not in {t["function"]["name"] for t in tools}:
            raise _bad(f"tool_choice names {choice.get('name')!r}, which is not among the function tools",
                       "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad(f"tool_choice {choice!r} is not supported: use auto, none, required or "
               '{"type": "function", "name": ...} (only function tools run on this server)', "tool_choice")


def _response_format(text: TextConfig | None) -> dict | None:
    fmt = (text.format if text else None) or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format json_schema needs a `schema` object", "text.format")
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    raise _bad(f"text.format type {kind!r} is not one of text, json_object, json_schema", "text.format")


def _thinking(body: ResponsesRequest, policy: ThinkingPolicy) -> tuple[bool, int | None, bool | None]:
    """(thinks, budget, clear_thinking): reasoning.effort and chat_template_kwargs (server/thinking.py)."""
    enable, budget = openai_thinking(policy, effort_value=body.reasoning.effort if body.reasoning else None,
                                     kwargs=body.chat_template_kwargs)
    clear = (body.chat_template_kwargs or {}).get("clear_thinking")
    return enable, budget, (None if clear is None else bool(clear))


def to_turn(body: ResponsesRequest, policy: ThinkingPolicy = ThinkingPolicy()) -> TurnRequest:
    """Translate a Responses body into the neutral TurnRequest (raises APIError 400)."""
    if body.previous_response_id:
        raise _bad(STATELESS.format(what="previous_response_id"), "previous_response_id")
    tools, _, _ = _function_tools(body.tools)
    enable, budget, clear = _thinking(body, policy)
    sampling = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k") if getattr(body, k) is not None}
    if body.seed is not None:
        sampling["seed"] = body.seed & 0xFFFFFFFF
    return TurnRequest(messages=input_messages(body), tools=tools or None,
                       tool_choice=_tool_choice(body.tool_choice, tools), enable_thinking=enable,
                       think_budget=budget, clear_thinking=clear, response_format=_response_format(body.text), sampling=sampling,
                       max_tokens=body.max_output_tokens, parallel_tool_calls=body.parallel_tool_calls is not False)


def echo_of(body: ResponsesRequest) -> dict:
    """The request settings a Response object repeats back to the client."""
    return {
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False, "temperature": body.temperature,
        "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
        "tools": [t for t in body.tools or [] if t.get("type") in ("function", "namespace")],
        "text": {"format": (body.text.format if body.text else None) or {"type": "text"}},
        "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                      "summary": body.reasoning.summary if body.reasoning else None},
        "encrypt_reasoning": "reasoning.encrypted_content" in (body.include or []),
        "namespaces": _function_tools(body.tools)[2],
    }
