"""OpenAI Responses API adapter (POST /v1/responses): request bodies -> TurnRequest, events -> response JSON.

Pure translation, no I/O. Codex CLI (`wire_api = "responses"`) and other newer agents speak this API. The
server is stateless: the client resends the whole conversation as `input` items each turn (as Codex does with
`store = false`), `store` is ignored and `previous_response_id` / `item_reference` are refused with a 400.
Only function tools run here (a `namespace`'s functions are flattened in, and their calls carry `namespace`);
OpenAI's hosted tools (web_search, file_search, ...) and custom/local_shell tools are dropped from the prompt
(`ignored_tools` names them; the app logs it once).

Reasoning items carry GLM's thinking as `content: [{type: reasoning_text}]`, mirrored into `summary` when the
request asks for one (Codex sends summary "auto" and shows summaries). With `include:
["reasoning.encrypted_content"]` (Codex sends it) the text also travels in `encrypted_content` - base64, not
encrypted: this is a local server - so it comes back even from clients that only echo that field.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.glm.tools import ToolChoice
from glmlocal.server.errors import APIError
from glmlocal.server.openai import arguments_dict, text_of
from glmlocal.server.types import ChatItem, TurnRequest, Usage

ENCRYPTED_PREFIX = "glmlocal.v1:"
STATELESS = ("this server is stateless: send the whole conversation in `input` (with store=false) instead of "
             "{what}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ReasoningConfig(_Body):
    effort: str | None = None
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
    chat_template_kwargs: dict[str, object] | None = None  # as on the chat route: enable_thinking, clear_thinking


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
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


def _thinking(body: ResponsesRequest, default_thinking: bool) -> tuple[bool, bool | None]:
    enable = default_thinking
    if body.reasoning is not None and body.reasoning.effort is not None:
        enable = body.reasoning.effort not in ("none", "minimal")
    kwargs = body.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        enable = bool(kwargs["enable_thinking"])
    clear = kwargs.get("clear_thinking")
    return enable, (None if clear is None else bool(clear))


def to_turn(body: ResponsesRequest, *, default_thinking: bool = True) -> TurnRequest:
    """Translate a Responses body into the neutral TurnRequest (raises APIError 400)."""
    if body.previous_response_id:
        raise _bad(STATELESS.format(what="previous_response_id"), "previous_response_id")
    tools, _, _ = _function_tools(body.tools)
    enable, clear = _thinking(body, default_thinking)
    sampling = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k") if getattr(body, k) is not None}
    if body.seed is not None:
        sampling["seed"] = body.seed & 0xFFFFFFFF
    return TurnRequest(messages=input_messages(body), tools=tools or None,
                       tool_choice=_tool_choice(body.tool_choice, tools), enable_thinking=enable,
                       clear_thinking=clear, response_format=_response_format(body.text), sampling=sampling,
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


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
def usage_json(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens,
                                     "cache_write_tokens": max(0, u.prompt_tokens - u.cached_tokens)},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Output:
    """Shared by the streamed and whole-response builders: ids, the request echo and the Response object."""

    def __init__(self, model: str, echo: dict):
        self.id, self.model, self.created = _new_id("resp"), model, int(time.time())
        self.echo = {k: v for k, v in echo.items() if k not in ("encrypt_reasoning", "namespaces")}
        self.encrypt = bool(echo.get("encrypt_reasoning"))
        # A summary was asked for (Codex sends "auto"): clients show summaries, so the thinking goes there too.
        self.summarize = bool((echo.get("reasoning") or {}).get("summary"))
        self.namespaces: dict[str, str] = echo.get("namespaces") or {}
        self.items: list[dict] = []  # finished output items, in output order
        self.reason: str | None = None

    def reasoning_item(self, item_id: str, text: str, status: str) -> dict:
        summary = [{"type": "summary_text", "text": text}] if self.summarize else []
        item = {"id": item_id, "type": "reasoning", "summary": summary,
                "content": [{"type": "reasoning_text", "text": text}], "status": status}
        if self.encrypt:
            item["encrypted_content"] = encode_reasoning(text)
        return item

    @staticmethod
    def message_item(item_id: str, text: str, status: str) -> dict:
        return {"id": item_id, "type": "message", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def call_item(self, item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
        item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}
        if name in self.namespaces:
            item["namespace"] = self.namespaces[name]
        return item

    @property
    def truncated(self) -> bool:
        return self.reason == "length"

    def response(self, status: str, usage: Usage | None = None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": error, "incomplete_details": incomplete, "model": self.model,
                "output": list(self.items), "previous_response_id": None, "store": False, "truncation": "disabled",
                "metadata": {}, "user": None, **self.echo,
                "usage": None if usage is None else usage_json(usage)}

    def final(self, usage: Usage) -> dict:
        return self.response("incomplete" if self.truncated else "completed", usage)


class ResponseStream(_Output):
    """Turns the backend's items (events, then a final Usage) into Responses SSE events (name, data), with
    the output_index / content_index / item_id / sequence_number fields the openai SDK's accumulator checks."""

    def __init__(self, model: str, echo: dict):
        super().__init__(model, echo)
        self.seq = -1
        self.kind: str | None = None  # the open item: "reasoning" | "message" | "function_call"
        self.item_id = ""
        self.text: list[str] = []
        self.call: tuple[str, str] = ("", "")  # call_id, name of the open function_call

    def _event(self, name: str, **data: object) -> tuple[str, dict]:
        self.seq += 1
        return name, {"type": name, "sequence_number": self.seq, **data}

    def _where(self) -> dict:
        return {"item_id": self.item_id, "output_index": len(self.items)}

    def start(self) -> list[tuple[str, dict]]:
        snapshot = self.response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _open(self, kind: str, item: dict, part: dict | None) -> list[tuple[str, dict]]:
        out = self._close()
        self.kind, self.item_id, self.text = kind, item["id"], []
        out.append(self._event("response.output_item.added", output_index=len(self.items), item=item))
        if part is not None:
            out.append(self._event("response.content_part.added", **self._where(), content_index=0, part=part))
        return out

    def _close(self, status: str = "completed") -> list[tuple[str, dict]]:
        if self.kind is None:
            return []
        text, where = "".join(self.text), self._where()
        if self.kind == "function_call":
            item = self.call_item(self.item_id, *self.call, text, status)
            out = [] if status != "completed" else [
                self._event("response.function_call_arguments.done", **where, arguments=text)]
        else:
            reasoning = self.kind == "reasoning"
            item = (self.reasoning_item if reasoning else self.message_item)(self.item_id, text, status)
            part = item["content"][0]
            done = ("response.reasoning_text.done", {}) if reasoning else ("response.output_text.done",
                                                                             {"logprobs": []})
            out = [self._event(done[0], **where, content_index=0, text=text, **done[1]),
                   self._event("response.content_part.done", **where, content_index=0, part=part)]
            if reasoning and self.summarize:
                out += self._summary_done(where, item["summary"][0], status)
        out.append(self._event("response.output_item.done", output_index=where["output_index"], item=item))
        if status == "completed" or self.kind != "function_call":  # a call cut off by the limit is not kept
            self.items.append(item)
        self.kind = None
        return out

    def _summary_done(self, where: dict, part: dict, status: str) -> list[tuple[str, dict]]:
        cut = {"status": "incomplete"} if status == "incomplete" else {}
        return [self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=part["text"]),
                self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part, **cut)]

    def _text(self, kind: str, text: str) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if self.kind != kind:
            if kind == "reasoning":
                item = self.reasoning_item(_new_id("rs"), "", "in_progress")
                item["content"], item["summary"] = [], []
                out = self._open(kind, item, {"type": "reasoning_text", "text": ""})
                if self.summarize:
                    out.append(self._event("response.reasoning_summary_part.added", **self._where(),
                                           summary_index=0, part={"type": "summary_text", "text": ""}))
            else:
                item = self.message_item(_new_id("msg"), "", "in_progress")
                item["content"] = []
                out = self._open(kind, item, {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self.text.append(text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        out.append(self._event(name, **self._where(), content_index=0, delta=text, **extra))
        if kind == "reasoning" and self.summarize:
            out.append(self._event("response.reasoning_summary_text.delta", **self._where(), summary_index=0,
                                   delta=text))
        return out

    def feed(self, item: ChatItem) -> list[tuple[str, dict]]:
        if isinstance(item, ReasoningDelta) and item.text:
            return self._text("reasoning", item.text)
        if isinstance(item, ContentDelta) and item.text:
            return self._text("message", item.text)
        if isinstance(item, ToolCallStart):
            self.call = (item.id, item.name)
            return self._open("function_call", self.call_item(_new_id("fc"), item.id, item.name, "", "in_progress"),
                              None)
        if isinstance(item, ToolCallArgsDelta) and self.kind == "function_call":
            self.text.append(item.text)
            return [self._event("response.function_call_arguments.delta", **self._where(), delta=item.text)]
        if isinstance(item, ToolCallEnd) and self.kind == "function_call":
            out = []
            if not self.text:  # the parser sent no fragments: the whole arguments at once
                args = json.dumps(item.arguments, ensure_ascii=False)
                self.text.append(args)
                out.append(self._event("response.function_call_arguments.delta", **self._where(), delta=args))
            return out + self._close()
        if isinstance(item, Finish):
            self.reason = item.reason
        if isinstance(item, Usage):
            out = self._close("incomplete" if self.truncated else "completed")
            final = self.final(item)
            name = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            return out + [self._event(name, response=final)]
        return []

    def fail(self, error: dict) -> list[tuple[str, dict]]:
        """After the 200 went out: an `error` event, then `response.failed` (error = {code, message})."""
        code = error.get("code") or error.get("type") or "server_error"
        message = error.get("message", "")
        failed = self.response("failed", error={"code": code, "message": message})
        return [self._event("error", code=code, message=message, param=error.get("param")),
                self._event("response.failed", response=failed)]


class ResponseAggregate:
    """Collects the backend's items into one non-streamed Response object: the final snapshot of the same
    event stream a streaming client gets, so both shapes agree by construction."""

    def __init__(self, model: str, echo: dict):
        self.stream = ResponseStream(model, echo)
        self.stream.start()
        self.final: dict | None = None

    def feed(self, item: ChatItem) -> None:
        for name, data in self.stream.feed(item):
            if name in ("response.completed", "response.incomplete"):
                self.final = data["response"]

    def response_json(self) -> dict:
        return self.final or self.stream.final(Usage())


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
