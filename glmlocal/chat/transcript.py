"""The chat conversation as data: OpenAI-shaped messages, saved as a chat-completions request body.

A saved transcript is `{"model", "messages", "tools"?, "chat_template_kwargs": {"enable_thinking",
"thinking_budget"?}}`, so the
same file can be sent to `glmlocal serve` (or any OpenAI-compatible server) unchanged, and `/load` accepts
any such request body.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from glmlocal.errors import InputError
from glmlocal.glm.template import content_text

ROLES = ("system", "user", "assistant", "tool")


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text


class ToolCall(TypedDict):
    """One entry of an assistant message's `tool_calls`, in OpenAI wire form."""

    id: str
    type: str
    function: FunctionCall


@dataclass
class Conversation:
    """System prompt, turn history and tool definitions of one chat."""

    model: str = "glmlocal"
    system: str | None = None
    messages: list[dict[str, object]] = field(default_factory=list)
    tools: list[dict[str, object]] | None = None
    enable_thinking: bool = True
    think_budget: int | None = None  # most tokens a reply may think (None: no limit)

    def request_messages(self) -> list[dict[str, object]]:
        """The messages to render: the system prompt (if any) followed by the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages)

    def turn_starts(self) -> list[int]:
        """Indices of the user messages; each starts one turn (user + assistant/tool replies)."""
        return [i for i, m in enumerate(self.messages) if m.get("role") == "user"]

    @property
    def n_turns(self) -> int:
        return len(self.turn_starts())

    def drop_oldest(self, n: int) -> int:
        """Remove the oldest `n` turns (keeping the system prompt); return how many were removed."""
        starts = self.turn_starts()
        if n <= 0 or not starts:
            return 0
        n = min(n, len(starts))
        cut = starts[n] if n < len(starts) else len(self.messages)
        del self.messages[:cut]
        return n

    def clear(self) -> None:
        """Forget the history; the system prompt and tools stay."""
        self.messages.clear()

    def to_request(self) -> dict[str, object]:
        """An OpenAI chat-completions request body holding the whole conversation."""
        body: dict[str, object] = {"model": self.model, "messages": self.request_messages()}
        if self.tools:
            body["tools"] = self.tools
        body["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        if self.think_budget is not None:  # the server's extension, so the file is a valid request for it too
            body["chat_template_kwargs"]["thinking_budget"] = self.think_budget
        return body

    @classmethod
    def from_request(cls, body: object, source: str = "transcript") -> Conversation:
        """Build a conversation from a request body; raise InputError naming what is wrong."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise InputError(f"{source}: expected a JSON object with a \"messages\" list")
        messages = [_check_message(m, i, source) for i, m in enumerate(body["messages"])]
        tools = body.get("tools")
        if tools is not None:
            tools = check_tools(tools, source)
        system = None
        if messages and messages[0]["role"] == "system":
            system = content_text(messages.pop(0)["content"])
        kwargs = body.get("chat_template_kwargs") or {}
        return cls(
            model=str(body.get("model") or "glmlocal"),
            system=system,
            messages=messages,
            tools=tools or None,
            enable_thinking=bool(kwargs.get("enable_thinking", True)),
            think_budget=_budget(kwargs.get("thinking_budget"), source),
        )

    def save(self, path: Path) -> None:
        """Write the transcript atomically (`.part`, then rename)."""
        path = Path(path).expanduser()
        part = path.with_name(path.name + ".part")
        try:
            part.write_text(json.dumps(self.to_request(), indent=2, ensure_ascii=False) + "\n", "utf-8")
            os.replace(part, path)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise InputError(f"cannot write {path}: {e.strerror or e}") from e

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """Read a transcript or any OpenAI chat-completions request body."""
        path = Path(path).expanduser()
        return cls.from_request(_read_json(path), source=str(path))


def _check_message(m: object, i: int, source: str) -> dict[str, object]:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise InputError(f"{source}: message {i} needs a role of {', '.join(ROLES)}")
    msg = dict(m)
    content = msg.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise InputError(f"{source}: message {i} has content that is neither text nor a list of parts")
    if isinstance(content, list):
        msg["content"] = content_text(content)
    calls = msg.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(_is_call(c) for c in calls)):
        raise InputError(f"{source}: message {i} has malformed tool_calls")
    return msg


def _budget(value: object, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{source}: chat_template_kwargs.thinking_budget must be a whole number of tokens, at "
                         f"least 1; got {value!r}")
    return value


def _is_call(c: object) -> bool:
    fn = c.get("function") if isinstance(c, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str)


def check_tools(tools: object, source: str) -> list[dict[str, object]]:
    """Validate OpenAI-format tool definitions (`[{"type": "function", "function": {...}}]`)."""
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise InputError(f"{source}: expected a list of tool definitions")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"{source}: tool {i} needs {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    return tools


def load_tools(path: Path) -> list[dict[str, object]]:
    """Read `--tools FILE`: a JSON list of OpenAI tool definitions, or an object with a "tools" list."""
    path = Path(path).expanduser()
    return check_tools(_read_json(path), str(path))


def _read_json(path: Path) -> object:
    """A JSON file's contents; unreadable or invalid files are one-line InputErrors."""
    try:
        return json.loads(path.read_text("utf-8"))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e


def tool_call_message(call_id: str, name: str, arguments: Mapping[str, object]) -> ToolCall:
    """One entry of an assistant message's `tool_calls`, in OpenAI wire form (arguments as JSON text)."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def new_chat_path(folder: Path) -> Path:
    """Where a new chat autosaves: `<folder>/<YYYYmmdd-HHMMSS>.json` (a suffix keeps names unique)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{stamp}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{n}.json"
    return path


def latest_chat(folder: Path) -> Path | None:
    """The most recently written autosaved chat in `folder`, if any."""
    chats = [p for p in folder.glob("*.json") if p.is_file()] if folder.is_dir() else []
    return max(chats, key=lambda p: p.stat().st_mtime_ns, default=None)

