"""Running one model turn for `glmlocal chat`: the session call, the assistant message it builds, and the
terminal handling around it (Ctrl-C sets a cancel event; typed-ahead keys are not echoed into the output).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from glmlocal.chat.transcript import Conversation, ToolCall, tool_call_message
from glmlocal.engine.session import TurnResult
from glmlocal.glm.events import (
    ContentDelta,
    Event,
    Finish,
    ReasoningDelta,
    ToolCallEnd,
    ToolCallStart,
)


class TurnItems(Protocol):
    """A running turn (glmlocal.engine.session.TurnStream): glm events, then one TurnResult. While it runs,
    `reasoning_tokens` counts the tokens generated inside thinking blocks; `close()` releases the engine."""

    reasoning_tokens: int

    def __iter__(self) -> Iterator[Event | TurnResult]: ...

    def close(self) -> None: ...


class ChatSession(Protocol):
    """What the chat needs of a Session (glmlocal.engine.session.Session; tests script one).
    `options` are further Session.turn keywords: sampling, tool_choice, response_format."""

    def turn(self, messages: Sequence[Mapping[str, object]], tools: list[Mapping[str, object]] | None = None, *,
             enable_thinking: bool = True, cancel: threading.Event | None = None, max_tokens: int | None = None,
             think_budget: int | None = None, **options: object) -> TurnItems: ...


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
def quiet_tty(stream: TextIO | None = None) -> Iterator[None]:
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
    calls: list[ToolCall] = field(default_factory=list)
    reason: str = "stop"
    usage: TurnResult | None = None

    def add(self, ev: Event) -> None:
        if isinstance(ev, ReasoningDelta):
            self.reasoning += ev.text
        elif isinstance(ev, ContentDelta):
            self.content += ev.text
        elif isinstance(ev, ToolCallStart):
            self.call_ids[ev.index] = ev.id
        elif isinstance(ev, ToolCallEnd):  # only ended calls count: a cut-off call has no End
            call_id = ev.id or self.call_ids.get(ev.index) or f"call_{ev.index}"
            self.calls.append(tool_call_message(call_id, ev.name, ev.arguments))
        elif isinstance(ev, Finish):
            self.reason = ev.reason

    @property
    def empty(self) -> bool:
        return not (self.reasoning.strip() or self.content.strip() or self.calls)

    def message(self) -> dict[str, object]:
        msg: dict[str, object] = {"role": "assistant", "content": self.content.strip()}
        if self.reasoning.strip():
            msg["reasoning_content"] = self.reasoning.strip()
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg


class TurnRunner:
    """Runs one model turn for either front end; knows the session's calling convention."""

    def __init__(self, session: ChatSession, conversation: Conversation, max_tokens: int | None = None,
                 turn_kwargs: Mapping[str, object] | None = None):  # fmt: skip
        self.session = session
        self.conversation = conversation
        self.max_tokens = max_tokens
        self.turn_kwargs = dict(turn_kwargs or {})  # e.g. sampling settings from the command line
        self.stream: TurnItems | None = None  # the running turn

    def thinking_tokens(self) -> int | None:
        """Tokens the running turn has generated inside thinking blocks (None before it starts)."""
        return None if self.stream is None else self.stream.reasoning_tokens

    def items(self, cancel: threading.Event) -> TurnItems:
        conv = self.conversation
        # Session.turn yields glm events, then one TurnResult (the usage); see glmlocal/engine/session.py.
        self.stream = self.session.turn(conv.request_messages(), conv.tools, enable_thinking=conv.enable_thinking,
                                        cancel=cancel, max_tokens=self.max_tokens, think_budget=conv.think_budget,
                                        **self.turn_kwargs)
        return self.stream

    def run(self, cancel: threading.Event, on_event: Callable[[Event], None]) -> TurnRecord:
        """Stream one turn, feeding each event to `on_event`; the record holds message, reason and usage."""
        record = TurnRecord()
        items = self.items(cancel)
        try:
            for item in items:
                if isinstance(item, TurnResult):
                    record.usage = item
                else:
                    record.add(item)
                    on_event(item)
        finally:
            items.close()  # releases the engine even when rendering failed mid-turn
        if cancel.is_set() and record.reason != "cancelled":
            record.reason = "cancelled"
        return record
