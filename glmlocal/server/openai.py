"""OpenAI Chat Completions / Completions adapter: request bodies -> TurnRequest, events -> response JSON.

Pure translation, no I/O. Unknown request fields are accepted and ignored, because every agent sends a few
of its own (OpenAI's `user`, `store`, `metadata`; LiteLLM's extras).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.glm.template import content_text
from glmlocal.glm.tools import ToolChoice
from glmlocal.server.errors import APIError
from glmlocal.server.thinking import Effort, ThinkingPolicy, openai_thinking
from glmlocal.server.types import (
    ChatItem,
    CompletionItem,
    CompletionRequest,
    TextDelta,
    TurnRequest,
    Usage,
)

IMAGE_PLACEHOLDER = "[image omitted: this model reads text only]"


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, object] | None = None


class ToolCall(_Body):
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, object] | str] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content
    reasoning_details: list[dict[str, object]] | None = None  # OpenRouter's shape: [{"type": "reasoning.text", "text"}]


class FunctionDef(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, object] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool | None = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, object] | None = None


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=1)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions body (the fields glmlocal honours; others are ignored)."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, object] | None = None
    thinking: dict[str, object] | None = None  # z.ai style {"type": "enabled" | "disabled"}
    reasoning_effort: Effort | None = None


class CompletionBody(_Sampling):
    """POST /v1/completions body."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
def sampling_of(body: _Sampling) -> dict:
    """The sampling parameters the client set (unset ones keep the engine's defaults)."""
    out = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                         "frequency_penalty") if getattr(body, k) is not None}
    if body.repetition_penalty is not None:
        out["repeat_penalty"] = body.repetition_penalty
    if body.seed is not None:
        out["seed"] = body.seed & 0xFFFFFFFF  # llama.cpp seeds are uint32
    if body.logit_bias:
        out["logit_bias"] = logit_bias_of(body.logit_bias)
    return out


def logit_bias_of(raw: dict[str, float]) -> dict[int, float]:
    """OpenAI logit_bias -> token id: bias. As OpenAI documents, -100 bans a token."""
    out = {}
    for key, bias in raw.items():
        if not str(key).strip().isdigit() or not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias: {key!r}: {bias} is not a token id with a bias in [-100, 100]",
                           param="logit_bias")
        out[int(key)] = float("-inf") if bias <= -100 else float(bias)
    return out


def stop_list(stop: str | list[str] | None) -> list[str]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in items if s]


def text_of(content: object) -> str:
    """OpenAI content as prompt text: parts on their own lines, images as a placeholder."""
    return content_text(content, sep="\n", image=IMAGE_PLACEHOLDER)


def arguments_dict(arguments: str | dict | None) -> dict:
    """Tool-call arguments as the template needs them (a mapping); tolerant of what clients send back."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _details_text(details: list[dict[str, object]] | None) -> str | None:
    """The readable text of OpenRouter-style reasoning_details (encrypted or summary-only parts carry none)."""
    texts = [str(d.get("text") or "") for d in details or [] if d.get("type") == "reasoning.text"]
    return "".join(texts) if texts else None


def _message(m: ChatMessage) -> dict:
    role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
    out: dict[str, object] = {"role": role, "content": text_of(m.content)}
    if role == "assistant":
        reasoning = next((r for r in (m.reasoning_content, m.reasoning, _details_text(m.reasoning_details))
                          if r is not None), None)
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if m.tool_calls:
            out["tool_calls"] = [
                {"id": tc.id or f"call_{i}", "type": "function",
                 "function": {"name": tc.function.name, "arguments": arguments_dict(tc.function.arguments)}}
                for i, tc in enumerate(m.tool_calls)
            ]
    if role == "tool":
        out["tool_call_id"] = m.tool_call_id or m.name or ""
    return out


def _thinking(req: ChatCompletionRequest, policy: ThinkingPolicy) -> tuple[bool, int | None, bool | None]:
    """(thinks, budget, clear_thinking): server/thinking.py."""
    zai = req.thinking.get("type") if req.thinking else None
    enable, budget = openai_thinking(policy, effort_value=req.reasoning_effort, kwargs=req.chat_template_kwargs,
                                     enabled=zai == "enabled" if zai in ("enabled", "disabled") else None)
    clear = (req.chat_template_kwargs or {}).get("clear_thinking")
    return enable, budget, (None if clear is None else bool(clear))


def _tool_choice(req: ChatCompletionRequest, tools: list[dict] | None) -> ToolChoice:
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        names = {t["function"]["name"] for t in tools or []}
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        return {"type": "function", "function": {"name": choice.function.name}}
    if choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool", param="tool_choice")
    return choice or "auto"


def _response_format(rf: ResponseFormat | None) -> dict | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema":
        schema = (rf.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema (an object)",
                           param="response_format")
        return {"type": "json_schema", "json_schema": {**(rf.json_schema or {}), "schema": schema}}
    return {"type": "json_object"}


def to_turn(req: ChatCompletionRequest, policy: ThinkingPolicy = ThinkingPolicy()) -> TurnRequest:
    """Translate a Chat Completions body into the neutral TurnRequest (raises APIError 400)."""
    tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in req.tools or []]
    enable, budget, clear = _thinking(req, policy)
    return TurnRequest(
        messages=[_message(m) for m in req.messages],
        tools=tools or None,
        tool_choice=_tool_choice(req, tools),
        enable_thinking=enable,
        think_budget=budget,
        clear_thinking=clear,
        response_format=_response_format(req.response_format),
        sampling=sampling_of(req),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=stop_list(req.stop),
        parallel_tool_calls=req.parallel_tool_calls is not False,
    )


def to_completion(body: CompletionBody) -> CompletionRequest:
    prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
    return CompletionRequest(prompt=prompt, sampling=sampling_of(body), max_tokens=body.max_tokens or 16,
                             stop=stop_list(body.stop))


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
def usage_json(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def timings_json(u: Usage) -> dict:
    """llama-server's `timings` object: prompt tokens evaluated (cache_n reused), generated tokens, their times,
    and the speculative drafts (draft_n verified, draft_n_accepted agreed)."""
    prompt_n, prompt_ms, predicted_ms = u.prompt_tokens - u.cached_tokens, u.prompt_s * 1e3, u.decode_s * 1e3
    return {
        "cache_n": u.cached_tokens, "prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3),
        "prompt_per_second": round(prompt_n / u.prompt_s, 3) if u.prompt_s > 0 else 0.0,
        "predicted_n": u.completion_tokens, "predicted_ms": round(predicted_ms, 3),
        "predicted_per_second": round(u.decode_per_s, 3),
        "draft_n": u.draft_n, "draft_n_accepted": u.draft_n_accepted,
    }


def _finish_reason(reason: str | None) -> str:
    return {"length": "length", "tool_calls": "tool_calls"}.get(reason or "stop", "stop")


class ChatStream:
    """Turns the backend's items (events, then a final Usage) into chat.completion.chunk dicts."""

    def __init__(self, model: str, *, include_usage: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.model, self.created, self.include_usage = model, int(time.time()), include_usage
        self._reason: str | None = None
        self._args_sent: set[int] = set()

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def feed(self, item: ChatItem) -> list[dict]:
        if isinstance(item, ContentDelta):
            return [self._chunk({"content": item.text})] if item.text else []
        if isinstance(item, ReasoningDelta):  # both names: vLLM moved to `reasoning`, clients read either
            return [self._chunk({"reasoning_content": item.text, "reasoning": item.text})] if item.text else []
        if isinstance(item, ToolCallStart):
            call = {"index": item.index, "id": item.id, "type": "function",
                    "function": {"name": item.name, "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if isinstance(item, ToolCallArgsDelta):
            self._args_sent.add(item.index)
            return [self._chunk({"tool_calls": [{"index": item.index, "function": {"arguments": item.text}}]})]
        if isinstance(item, ToolCallEnd) and item.index not in self._args_sent:
            args = json.dumps(item.arguments, ensure_ascii=False)
            return [self._chunk({"tool_calls": [{"index": item.index, "function": {"arguments": args}}]})]
        if isinstance(item, Finish):
            self._reason = item.reason
        if isinstance(item, Usage):
            out = [{**self._chunk({}, _finish_reason(self._reason)), "timings": timings_json(item)}]
            if self.include_usage:
                out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage_json(item),
                            "timings": timings_json(item)})
            return out
        return []


class ChatAggregate:
    """Collects the backend's items into one non-streamed chat.completion."""

    def __init__(self, model: str):
        self.model = model
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.ids: dict[int, str] = {}
        self.reason: str | None = None
        self.usage = Usage()

    def feed(self, item: ChatItem) -> None:
        if isinstance(item, ToolCallStart):
            self.ids[item.index] = item.id
        elif isinstance(item, ContentDelta):
            self.content.append(item.text)
        elif isinstance(item, ReasoningDelta):
            self.reasoning.append(item.text)
        elif isinstance(item, ToolCallEnd):  # only completed calls count (see glm/events.py)
            call_id = item.id or self.ids.get(item.index) or f"call_{uuid.uuid4().hex[:24]}"
            self.calls.append({"id": call_id, "type": "function",
                               "function": {"name": item.name,
                                            "arguments": json.dumps(item.arguments, ensure_ascii=False)}})
        elif isinstance(item, Finish):
            self.reason = item.reason
        elif isinstance(item, Usage):
            self.usage = item

    def response(self) -> dict:
        message: dict[str, object] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            message["reasoning_content"] = message["reasoning"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = self.calls
        elif message["content"] is None:
            message["content"] = ""
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish_reason(self.reason)}],
            "usage": usage_json(self.usage),
            "timings": timings_json(self.usage),
        }


class CompletionStream:
    """text_completion objects for /v1/completions, streamed (`chunk`) or whole (`response`)."""

    def __init__(self, model: str):
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.model, self.created = model, int(time.time())
        self.text: list[str] = []
        self.reason: str | None = None
        self.usage = Usage()

    def _obj(self, text: str, finish: str | None, usage: Usage | None = None) -> dict:
        obj = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            obj["usage"] = usage_json(usage)
        return obj

    def feed(self, item: CompletionItem) -> list[dict]:
        if isinstance(item, TextDelta) and item.text:
            self.text.append(item.text)
            return [self._obj(item.text, None)]
        if isinstance(item, Finish):
            self.reason = item.reason
        if isinstance(item, Usage):
            self.usage = item
            return [self._obj("", _finish_reason(self.reason), item)]
        return []

    def response(self) -> dict:
        return self._obj("".join(self.text), _finish_reason(self.reason), self.usage)
