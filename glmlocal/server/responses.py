"""OpenAI Responses API responses: backend items -> the Response object, streamed as SSE events or whole.

Pure translation, no I/O; the request side is glmlocal.server.responses_request. Reasoning items carry GLM's
thinking as `content: [{type: reasoning_text}]`, mirrored into `summary` when the request asks for one (Codex
sends summary "auto" and shows summaries). With `include: ["reasoning.encrypted_content"]` (Codex sends it)
the text also travels in `encrypted_content` - base64, not encrypted: this is a local server - so it comes
back even from clients that only echo that field.
"""

from __future__ import annotations

import json
import time
import uuid

from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from glmlocal.server.responses_request import encode_reasoning
from glmlocal.server.types import ChatItem, Usage


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
