"""Running one model turn for `glmlocal chat`: the session call, the assistant message it builds, and the
terminal handling around it (Ctrl-C sets a cancel event; typed-ahead keys are not echoed into the output).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from glmlocal.chat.transcript import Conversation, tool_call_message
from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)

EVENT_TYPES = (ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd, Finish)


@contextmanager
def cancel_on_sigint(cancel: threading.Event) -> Iterator[None]:
    """While generating, Ctrl-C (SIGINT) sets `cancel` instead of raising, so the REPL survives it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def quiet_tty(stream: Any = None) -> Iterator[None]:
    """While generating, keys typed ahead are neither echoed into the live output nor lost: echo and line
    editing go off (prompt_toolkit reads them at the next prompt); ISIG stays on, so Ctrl-C still signals."""
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        old = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError, AttributeError):
        old = None
    if old is None:
        yield
        return
    new = list(old)
    new[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


@dataclass
class TurnRecord:
    """The assistant message being built from one turn's events."""

    reasoning: str = ""
    content: str = ""
    call_ids: dict[int, str] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    reason: str = "stop"
    usage: Any = None

    def add(self, ev: Any) -> None:
        if isinstance(ev, ReasoningDelta):
            self.reasoning += ev.text
        elif isinstance(ev, ContentDelta):
            self.content += ev.text
        elif isinstance(ev, ToolCallStart):
            self.call_ids[ev.index] = ev.id
        elif isinstance(ev, ToolCallEnd):  # only ended calls count: a cut-off call has no End
            call_id = getattr(ev, "id", "") or self.call_ids.get(ev.index) or f"call_{ev.index}"
            self.calls.append(tool_call_message(call_id, ev.name, ev.arguments))
        elif isinstance(ev, Finish):
            self.reason = ev.reason

    @property
    def empty(self) -> bool:
        return not (self.reasoning.strip() or self.content.strip() or self.calls)

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content.strip()}
        if self.reasoning.strip():
            msg["reasoning_content"] = self.reasoning.strip()
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg


class TurnRunner:
    """Runs one model turn for either front end; knows the session's calling convention."""

    def __init__(self, session: Any, conversation: Conversation, max_tokens: int | None = None,
                 turn_kwargs: dict[str, Any] | None = None):  # fmt: skip
        self.session = session
        self.conversation = conversation
        self.max_tokens = max_tokens
        self.turn_kwargs = dict(turn_kwargs or {})  # e.g. sampling settings from the command line
        self.stream: Any = None  # the running turn (a session.TurnStream)

    def thinking_tokens(self) -> int | None:
        """Tokens the running turn has generated inside thinking blocks (None if the session does not say)."""
        return getattr(self.stream, "reasoning_tokens", None)

    def items(self, cancel: threading.Event) -> Iterator[Any]:
        conv = self.conversation
        kwargs: dict[str, Any] = {**self.turn_kwargs, "enable_thinking": conv.enable_thinking, "cancel": cancel}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        # Session.turn yields glm events, then one TurnResult (the usage); see glmlocal/session.py.
        self.stream = self.session.turn(conv.request_messages(), conv.tools, **kwargs)
        return self.stream

    def run(self, cancel: threading.Event, on_event: Callable[[Any], None]) -> TurnRecord:
        """Stream one turn, feeding each event to `on_event`; the record holds message, reason and usage."""
        record = TurnRecord()
        items = self.items(cancel)
        try:
            for item in items:
                if isinstance(item, EVENT_TYPES):
                    record.add(item)
                    on_event(item)
                else:
                    record.usage = item
        finally:
            getattr(items, "close", lambda: None)()  # releases the engine even when rendering failed mid-turn
        if cancel.is_set() and record.reason != "cancelled":
            record.reason = "cancelled"
        return record
