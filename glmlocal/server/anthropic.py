"""Anthropic Messages adapter: request bodies -> TurnRequest, events -> message / SSE event dicts.

Pure translation, no I/O. Claude Code's extras (cache_control on any block, metadata, anthropic-beta
features, server tools) are accepted and ignored; its per-request billing header system block is dropped so
the prompt prefix - and with it the KV cache - stays identical between turns (anthropics/claude-code#32636).
"""

from __future__ import annotations

import hashlib
import json
import re
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
from glmlocal.glm.tools import ToolChoice as TurnToolChoice
from glmlocal.server.errors import APIError
from glmlocal.server.openai import IMAGE_PLACEHOLDER
from glmlocal.server.thinking import ThinkingPolicy, anthropic_thinking
from glmlocal.server.types import ChatItem, TurnRequest, Usage

# "x-anthropic-billing-header: cc_version=2.1.37.abc; cc_entrypoint=cli; cch=1a2b3;" - cch changes every request.
BILLING_LINE = re.compile(r"^\s*x-anthropic-billing-header:[^\n]*(\n|$)", re.MULTILINE | re.IGNORECASE)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Body):
    # Claude Code (2.1.3xx) also sends role "system" inside `messages` (its environment block, after the
    # first user turn); GLM's templates render a system turn anywhere, so it is kept in place.
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, object]]


class ToolDef(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, object] | None = None
    type: str | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None  # checked in server/thinking.py (a whole number >= 1, < max_tokens)


class CountTokensRequest(_Body):
    """POST /v1/messages/count_tokens body."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, object]] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages body (the fields glmlocal honours; others are ignored)."""

    max_tokens: int = Field(4096, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
def normalise_system(text: str) -> str:
    """Drop Claude Code's per-request billing header line (it would move the prompt prefix every turn)."""
    return BILLING_LINE.sub("", text)


def _block_text(block: dict) -> str:
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text") or "")
    if kind == "image":
        return IMAGE_PLACEHOLDER
    if kind == "document":
        source = block.get("source") or {}
        return str(source.get("data") or "") if source.get("type") == "text" else IMAGE_PLACEHOLDER
    return ""


def _blocks_text(content: str | list | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(t for t in (_block_text(b) for b in content if isinstance(b, dict)) if t)


def _system(system: str | list[dict] | None) -> dict | None:
    if system is None:
        return None
    if isinstance(system, str):
        text = normalise_system(system)
    else:
        texts = [normalise_system(_block_text(b)) for b in system if isinstance(b, dict)]
        text = "\n".join(t for t in texts if t.strip())
    return {"role": "system", "content": text} if text.strip() else None


def _user(content: str | list[dict]) -> list[dict]:
    """One Anthropic user turn -> tool messages (for tool_result blocks, in order) and user text."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out, texts = [], []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            result = _blocks_text(block.get("content"))
            if block.get("is_error"):
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""), "content": result})
        else:
            text = _block_text(block)
            if text:
                texts.append(text)
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(content: str | list[dict]) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, thinking, calls = [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking") or ""))
        elif kind == "tool_use":
            args = block.get("input")
            calls.append({"id": str(block.get("id") or f"toolu_{len(calls)}"), "type": "function",
                          "function": {"name": str(block.get("name") or ""),
                                       "arguments": args if isinstance(args, dict) else {}}})
    out: dict[str, object] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        out["reasoning_content"] = "\n".join(thinking)
    if calls:
        out["tool_calls"] = calls
    return out


def _tools(tools: list[ToolDef] | None) -> list[dict] | None:
    # Server tools (web_search_..., with a `type` and no input_schema) run on Anthropic's side; we cannot.
    out = []
    for t in tools or []:
        if t.input_schema is None and t.type not in (None, "custom"):
            continue
        fn = {"name": t.name, "parameters": t.input_schema or {"type": "object", "properties": {}}}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(choice: ToolChoice | None, tools: list[dict] | None) -> TurnToolChoice:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "none":
        return "none"
    if not tools:
        raise APIError(400, f"tool_choice {choice.type!r} needs at least one tool")
    if choice.type == "any":
        return "required"
    if choice.name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {choice.name!r}, which is not in tools")
    return {"type": "function", "function": {"name": choice.name}}


def to_turn(req: CountTokensRequest, policy: ThinkingPolicy = ThinkingPolicy()) -> TurnRequest:
    """Translate a Messages (or count_tokens) body into the neutral TurnRequest (raises APIError 400).
    No `thinking` field means no thinking, as on Anthropic's API (server/thinking.py)."""
    messages = [m for m in [_system(req.system)] if m]
    for m in req.messages:
        if m.role == "system":
            messages.extend(m for m in [_system(m.content)] if m)
        else:
            messages.extend(_user(m.content) if m.role == "user" else [_assistant(m.content)])
    tools = _tools(req.tools)
    max_tokens = req.max_tokens if isinstance(req, MessagesRequest) else None
    enable, budget = anthropic_thinking(policy, req.thinking.type if req.thinking else None,
                                        req.thinking.budget_tokens if req.thinking else None, max_tokens)
    turn = TurnRequest(messages=messages, tools=tools, tool_choice=_tool_choice(req.tool_choice, tools),
                       enable_thinking=enable, think_budget=budget,
                       parallel_tool_calls=not (req.tool_choice and req.tool_choice.disable_parallel_tool_use))
    if isinstance(req, MessagesRequest):
        turn.max_tokens = req.max_tokens
        turn.stop = [s for s in req.stop_sequences or [] if s]
        turn.sampling = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k") if getattr(req, k) is not None}
    return turn


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
def usage_json(u: Usage) -> dict:
    """Anthropic counts cached prompt tokens apart from input_tokens."""
    return {"input_tokens": max(0, u.prompt_tokens - u.cached_tokens), "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def stop_reason(reason: str | None, usage: Usage) -> str:
    if usage.stop_sequence is not None:
        return "stop_sequence"
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(reason or "stop", "end_turn")


def signature(thinking: str) -> str:
    """An opaque, deterministic signature for a thinking block (clients echo it back; we ignore it)."""
    return "glmlocal-" + hashlib.sha256(thinking.encode("utf-8", "replace")).hexdigest()[:32]


class MessageStream:
    """Turns the backend's items (events, then a final Usage) into Anthropic SSE events (name, data).
    message_start's usage splits the prompt into the tokens the KV cache already holds (as far as it is known
    before generation: `cached_tokens`) and the rest; message_delta's usage is the turn's exact count."""

    def __init__(self, model: str, prompt_tokens: int = 0, cached_tokens: int = 0):
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model, self.prompt_tokens, self.cached_tokens = model, prompt_tokens, cached_tokens
        self._index = -1
        self._open: str | None = None  # "thinking" | "text" | "tool_use"
        self._call_index: int | None = None
        self._args_sent = False
        self._thinking: list[str] = []
        self._reason: str | None = None

    def start(self) -> list[tuple[str, dict]]:
        message = {"id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                   "stop_reason": None, "stop_sequence": None,
                   "usage": usage_json(Usage(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens))}
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if self._open == "thinking":
            delta = {"type": "signature_delta", "signature": signature("".join(self._thinking))}
            out.append(("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}))
        if self._open is not None:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._open, self._call_index, self._thinking = None, None, []
        return out

    def _open_block(self, kind: str, block: dict) -> list[tuple[str, dict]]:
        out = self._close()
        self._index += 1
        self._open = kind
        out.append(("content_block_start", {"type": "content_block_start", "index": self._index,
                                            "content_block": block}))
        return out

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return ("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def feed(self, item: ChatItem) -> list[tuple[str, dict]]:
        if isinstance(item, ReasoningDelta) and item.text:
            out = [] if self._open == "thinking" else self._open_block(
                "thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self._thinking.append(item.text)
            return out + [self._delta({"type": "thinking_delta", "thinking": item.text})]
        if isinstance(item, ContentDelta) and item.text:
            out = [] if self._open == "text" else self._open_block("text", {"type": "text", "text": ""})
            return out + [self._delta({"type": "text_delta", "text": item.text})]
        if isinstance(item, ToolCallStart):
            out = self._open_block("tool_use", {"type": "tool_use", "id": item.id, "name": item.name, "input": {}})
            self._call_index, self._args_sent = item.index, False
            return out
        if isinstance(item, ToolCallArgsDelta) and item.index == self._call_index:
            self._args_sent = True
            return [self._delta({"type": "input_json_delta", "partial_json": item.text})]
        if isinstance(item, ToolCallEnd) and item.index == self._call_index and not self._args_sent:
            args = json.dumps(item.arguments, ensure_ascii=False)
            return [self._delta({"type": "input_json_delta", "partial_json": args})]
        if isinstance(item, Finish):
            self._reason = item.reason
        if isinstance(item, Usage):
            delta = {"stop_reason": stop_reason(self._reason, item), "stop_sequence": item.stop_sequence}
            return self._close() + [
                ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_json(item)}),
                ("message_stop", {"type": "message_stop"}),
            ]
        return []


class MessageAggregate:
    """Collects the backend's items into one non-streamed Anthropic message."""

    def __init__(self, model: str):
        self.model = model
        self.blocks: list[dict] = []
        self.ids: dict[int, str] = {}
        self.reason: str | None = None
        self.usage = Usage()

    def _append_text(self, kind: str, key: str, text: str) -> None:
        if self.blocks and self.blocks[-1]["type"] == kind:
            self.blocks[-1][key] += text
        else:
            self.blocks.append({"type": kind, key: text})

    def feed(self, item: ChatItem) -> None:
        if isinstance(item, ReasoningDelta) and item.text:
            self._append_text("thinking", "thinking", item.text)
        elif isinstance(item, ContentDelta) and item.text:
            self._append_text("text", "text", item.text)
        elif isinstance(item, ToolCallStart):
            self.ids[item.index] = item.id
        elif isinstance(item, ToolCallEnd):
            call_id = item.id or self.ids.get(item.index) or f"toolu_{uuid.uuid4().hex[:24]}"
            self.blocks.append({"type": "tool_use", "id": call_id,
                                "name": item.name, "input": item.arguments})
        elif isinstance(item, Finish):
            self.reason = item.reason
        elif isinstance(item, Usage):
            self.usage = item

    def response(self) -> dict:
        for block in self.blocks:
            if block["type"] == "thinking":
                block["signature"] = signature(block["thinking"])
        return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": self.model,
                "content": self.blocks, "stop_reason": stop_reason(self.reason, self.usage),
                "stop_sequence": self.usage.stop_sequence, "usage": usage_json(self.usage)}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
