"""Streaming parser for GLM-4.5/4.6/4.7 assistant output: decoded text chunks -> events (glm/events.py).

Decisions (each fixes a failure users report with local GLM runners, see shared/reference/users-and-agents.md):
- Both layouts parse: whitespace between structural tags is ignored, so the 4.5/4.6 newline layout, the 4.7
  compact layout and mixtures all work. Whitespace around reasoning and content is trimmed the way the
  templates trim it on re-render (held back, never guessed).
- `<think>` anywhere outside a tool call opens reasoning (covers 4.6's "\n<think>", interleaved thinking between
  tool calls); stray `<think>`/`</think>` never reach content. `starts_in_thinking=True` (GLM-4.7 prompts end with
  `<think>`) starts in reasoning. A `<tool_call>` inside reasoning closes it: models that forget `</think>` still
  get their calls executed. If the output ends ("stop") with the initial think block still open and nothing
  else written, the model skipped thinking, so its text is repeated as content (SGLang #37645: empty answers).
- Tool calls are emitted for any name, declared or not: an agent can answer "unknown tool" and the model
  recovers, while XML leaking into content cannot be acted on. Without any declared tools, `<tool_call>` blocks
  are left verbatim in the content (the client did not ask for native calls; e.g. Cline-style prompts).
- Argument values are typed by the tool's schema (glm/schema.py). String values stream as they arrive, raw,
  with their real newlines. XML entities (&lt; ...) are NOT unescaped: the template writes values raw, so the
  model does too, and unescaping would corrupt code that legitimately contains entities.
- `ToolCallEnd` commits a call. Output cut at max tokens (or cancelled) never commits the unfinished call. When
  the model itself stops right after a complete argument (forgetting `</tool_call>`) the call is committed.
- JSON-style calls from a drifting model (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, or a name
  followed by a JSON object) are accepted.
- Role/end tokens (`<|user|>`, `<|observation|>`, `<|endoftext|>`, ...) end the turn and are never content.
- Only text that could still be the start of a tag is held back between chunks.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Mapping

from glmlocal.glm import schema as sch
from glmlocal.glm.events import (
    ContentDelta,
    Event,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VAL_OPEN, VAL_CLOSE = "<arg_value>", "</arg_value>"
STOP_MARKERS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|assistant|>", "<|system|>")
_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _hold_from(buf: str, markers: tuple[str, ...]) -> int:
    """Index from which `buf` must be held back because it may be the start of a marker."""
    longest = max(len(m) for m in markers)
    start = max(0, len(buf) - longest + 1)
    for i in range(start, len(buf)):
        if buf[i] == "<":
            tail = buf[i:]
            if any(m.startswith(tail) for m in markers):
                return i
    return len(buf)


def _find_first(buf: str, markers: tuple[str, ...]) -> tuple[int, str]:
    best, which = -1, ""
    for m in markers:
        i = buf.find(m)
        if i != -1 and (best == -1 or i < best):
            best, which = i, m
    return best, which


class StreamParser:
    """Incremental parser of one assistant turn. Feed decoded text; call finish() once at the end."""

    def __init__(self, family: str, tools: list[Mapping[str, object]] | None = None, *, starts_in_thinking: bool,
                 id_factory: Callable[[], str] = new_call_id):
        self.family = family
        self._tools = sch.tool_index(tools)
        self._tools_on = bool(tools)
        self._new_id = id_factory
        self._buf = ""
        self._state = "reasoning" if starts_in_thinking else "content"
        self._strip = True  # drop leading whitespace of the next text segment
        self._pending_ws = ""
        self._initial_open = starts_in_thinking  # the first think block is still open
        self._initial_text: list[str] = []
        self._saw_other = False  # content or a tool call appeared (for the skipped-thinking fallback)
        self._index = 0
        self._committed = 0
        self._done = False
        self._finished = False
        self._call: dict[str, object] = {}

    # ------------------------------------------------------------------ public API

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far leaves the parser inside a thinking block."""
        return self._state == "reasoning" and not self._done

    def feed(self, text: str) -> list[Event]:
        """Consume a chunk of decoded text; return the events it completes."""
        if self._finished or self._done or not text:
            return []
        self._buf += text
        out: list[Event] = []
        while not self._done and self._step(out):
            pass
        if self._done:
            self._buf = ""
        return out

    def finish(self, reason: str = "stop") -> list[Event]:
        """End of generation ("stop", "length" or "cancelled"): flush, commit or drop the open call, Finish."""
        if self._finished:
            return []
        self._finished = True
        out: list[Event] = []
        natural = reason in ("stop", "tool_calls")
        if not self._done:
            self._flush(out, natural)
        if natural and self._initial_open and not self._saw_other and "".join(self._initial_text).strip():
            out.append(ContentDelta("".join(self._initial_text).strip()))
        final = "tool_calls" if natural and self._committed else reason
        out.append(Finish(final))  # type: ignore[arg-type]
        return out

    # ------------------------------------------------------------------ text states

    def _text_markers(self) -> tuple[str, ...]:
        calls = (CALL_OPEN,) if self._tools_on else ()
        return (THINK_OPEN, THINK_CLOSE) + calls + STOP_MARKERS

    def _step(self, out: list[Event]) -> bool:
        handler = getattr(self, "_step_" + self._state)
        return handler(out)

    def _step_text(self, out: list[Event]) -> bool:
        markers = self._text_markers()
        i, marker = _find_first(self._buf, markers)
        if i == -1:
            hold = _hold_from(self._buf, markers)
            self._emit_text(out, self._buf[:hold])
            self._buf = self._buf[hold:]
            return False
        self._emit_text(out, self._buf[:i])
        self._buf = self._buf[i + len(marker):]
        self._on_text_marker(out, marker)
        return True

    _step_content = _step_text
    _step_reasoning = _step_text

    def _on_text_marker(self, out: list[Event], marker: str) -> None:
        reasoning = self._state == "reasoning"
        if marker in STOP_MARKERS:
            self._done = True
        elif marker == THINK_OPEN and not reasoning:
            self._switch("reasoning")
        elif marker == THINK_CLOSE and reasoning:
            self._initial_open = False
            self._switch("content")
        elif marker == CALL_OPEN:
            self._initial_open = False
            self._saw_other = True
            self._switch("call_head")
        # a stray <think> inside reasoning or </think> inside content is dropped

    def _switch(self, state: str) -> None:
        self._state = state
        self._strip = True
        self._pending_ws = ""

    def _emit_text(self, out: list[Event], text: str) -> None:
        if self._strip:
            text = text.lstrip()
            if not text:
                return
            self._strip = False
        core = text.rstrip()
        if not core:
            self._pending_ws += text
            return
        piece = self._pending_ws + core
        self._pending_ws = text[len(core):]
        if self._state == "reasoning":
            if self._initial_open:
                self._initial_text.append(piece)
            out.append(ReasoningDelta(piece))
        else:
            self._saw_other = True
            out.append(ContentDelta(piece))

    # ------------------------------------------------------------------ tool calls

    def _step_call_head(self, out: list[Event]) -> bool:
        """After <tool_call>: the function name, ended by a newline, a tag or '{' (JSON-style call)."""
        self._buf = self._buf.lstrip()
        if not self._buf:
            return False
        if self._buf[0] == "{":
            self._call = {"json_body": True}
            self._state = "call_json"
            return True
        ends = [i for i in (self._buf.find(c) for c in "\n<{") if i != -1]
        if not ends:
            return False
        end = min(ends)
        name = self._buf[:end].strip()
        self._buf = self._buf[end:]
        if not name:  # "<tool_call>" followed by another tag: not a call, keep parsing the rest as text
            self._switch("content")
            return True
        self._start_call(out, name)
        return True

    def _start_call(self, out: list[Event], name: str) -> None:
        call_id = self._new_id()
        self._call = {"name": name, "id": call_id, "args": {}, "opened": False}
        out.append(ToolCallStart(self._index, call_id, name))
        self._state = "call_args"

    def _args_delta(self, out: list[Event], text: str) -> None:
        out.append(ToolCallArgsDelta(self._index, text))

    def _step_call_args(self, out: list[Event]) -> bool:
        """Between arguments: expect <arg_key>, </tool_call>, or a JSON object of arguments."""
        self._buf = self._buf.lstrip()
        buf = self._buf
        if not buf:
            return False
        for marker, action in ((KEY_OPEN, "call_key"), (CALL_CLOSE, None)):
            if buf.startswith(marker):
                self._buf = buf[len(marker):]
                if action:
                    self._call["key"] = ""
                    self._state = action
                else:
                    self._end_call(out)
                return True
        if any(buf.startswith(m) for m in STOP_MARKERS):
            self._done = True
            self._commit_open_call(out)
            return False
        if buf[0] == "{" and not self._call["args"]:
            self._state = "call_json"
            return True
        if any(m.startswith(buf) for m in (KEY_OPEN, CALL_CLOSE) + STOP_MARKERS):
            return False  # a tag still arriving
        nxt = buf.find("<", 1)  # stray text inside a call: skip it
        self._buf = buf[nxt:] if nxt != -1 else ""
        return nxt != -1

    def _step_call_key(self, out: list[Event]) -> bool:
        i = self._buf.find(KEY_CLOSE, self._call.get("scan", 0))
        if i == -1:
            self._call["scan"] = max(0, len(self._buf) - len(KEY_CLOSE) + 1)
            return False
        self._call["scan"] = 0
        key = self._buf[:i].strip()
        self._buf = self._buf[i + len(KEY_CLOSE):]
        sep = ", " if self._call["opened"] else "{"
        self._call["opened"] = True
        self._call["key"] = key
        self._args_delta(out, sep + json.dumps(key, ensure_ascii=False) + ": ")
        self._state = "call_after_key"
        return True

    def _step_call_after_key(self, out: list[Event]) -> bool:
        self._buf = self._buf.lstrip()
        if not self._buf:
            return False
        if self._buf.startswith(VAL_OPEN):
            self._buf = self._buf[len(VAL_OPEN):]
            params = self._tools.get(self._call["name"])
            self._call["mode"] = sch.param_mode(params, self._call["key"])
            self._call["raw"] = []
            self._state = "call_value"
            if self._call["mode"] == "string":
                self._args_delta(out, '"')
            return True
        if VAL_OPEN.startswith(self._buf):
            return False
        # a key without a value: record null and carry on with whatever follows
        self._set_arg(out, None)
        return True

    def _step_call_value(self, out: list[Event]) -> bool:
        i = self._buf.find(VAL_CLOSE)
        if i == -1:
            hold = _hold_from(self._buf, (VAL_CLOSE,))
            self._value_text(out, self._buf[:hold])
            self._buf = self._buf[hold:]
            return False
        self._value_text(out, self._buf[:i])
        self._buf = self._buf[i + len(VAL_CLOSE):]
        raw = "".join(self._call["raw"])
        if self._call["mode"] == "string":
            self._args_delta(out, '"')
            self._call["args"][self._call["key"]] = raw
            self._state = "call_args"
        else:
            self._set_arg(out, sch.convert_value(raw, self._call["mode"]))
        return True

    def _value_text(self, out: list[Event], text: str) -> None:
        if not text:
            return
        self._call["raw"].append(text)
        if self._call["mode"] == "string":
            self._args_delta(out, json.dumps(text, ensure_ascii=False)[1:-1])

    def _set_arg(self, out: list[Event], value: object) -> None:
        self._args_delta(out, json.dumps(value, ensure_ascii=False))
        self._call["args"][self._call["key"]] = value
        self._state = "call_args"

    def _end_call(self, out: list[Event]) -> None:
        call = self._call
        self._args_delta(out, "}" if call["opened"] else "{}")
        out.append(ToolCallEnd(self._index, call["name"], dict(call["args"]), call["id"]))
        self._after_call()

    def _after_call(self) -> None:
        self._index += 1
        self._committed += 1
        self._call = {}
        self._switch("content")

    # ------------------------------------------------------------------ JSON-style calls

    def _step_call_json(self, out: list[Event]) -> bool:
        i = self._buf.find(CALL_CLOSE, self._call.get("scan", 0))
        if i == -1:  # remember how far we looked: a long JSON body must not be rescanned per chunk
            self._call["scan"] = max(0, len(self._buf) - len(CALL_CLOSE) + 1)
            return False
        body, self._buf = self._buf[:i], self._buf[i + len(CALL_CLOSE):]
        self._finish_json_call(out, body)
        return True

    def _finish_json_call(self, out: list[Event], body: str) -> None:
        try:
            obj = json.loads(body.strip())
        except (json.JSONDecodeError, RecursionError):
            obj = None
        if self._call.get("json_body"):
            name = obj.get("name") if isinstance(obj, dict) else None
            args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    args = None
            if not isinstance(name, str) or not isinstance(args, dict):
                self._call = {}
                self._switch("content")
                shown = CALL_OPEN + body + CALL_CLOSE  # not a call: show what the model wrote, minus think tags
                for tag in (THINK_OPEN, THINK_CLOSE) + STOP_MARKERS:
                    shown = shown.replace(tag, "")
                self._saw_other = True
                out.append(ContentDelta(shown))
                return
            self._start_call(out, name)
        else:
            args = obj
            if not isinstance(args, dict):
                self._call = {}
                self._switch("content")  # unusable arguments: never commit a guessed call
                return
        self._args_delta(out, json.dumps(args, ensure_ascii=False))
        out.append(ToolCallEnd(self._index, self._call["name"], args, self._call["id"]))
        self._after_call()

    # ------------------------------------------------------------------ end of output

    def _commit_open_call(self, out: list[Event]) -> None:
        """The model ended inside a call: commit it only at a clean boundary (after the name or a value)."""
        state = self._state
        if state == "call_args" and self._call.get("name") is not None:
            self._end_call(out)
        elif state == "call_json":
            self._finish_json_call(out, self._buf)
        elif state == "call_head" and self._buf.strip() and not self._buf.strip().startswith("<"):
            self._start_call(out, self._buf.strip())
            self._end_call(out)
        self._buf = ""

    def _flush(self, out: list[Event], natural: bool) -> None:
        if self._state in ("content", "reasoning"):
            tail = self._buf
            if not (tail.startswith("<|") and any(m.startswith(tail) for m in STOP_MARKERS)):
                self._emit_text(out, tail)  # nothing can complete the tag now: it was text
        elif natural:
            self._commit_open_call(out)
        self._buf = ""
