"""`glmlocal chat` with stdin not a terminal: prompts from stdin, plain-text answers on stdout.

The whole of stdin is one prompt (so `cat file | glmlocal chat M` and multi-line prompts work); with
`--each-line` every non-empty line is a separate turn of one conversation. Thinking is omitted unless
--show-thinking, which prints it first inside <think>...</think>. Errors: one line on stderr, non-zero exit.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TextIO

from glmlocal.chat.transcript import Conversation
from glmlocal.chat.turn import ChatSession, TurnRecord, TurnRunner
from glmlocal.errors import GlmlocalError
from glmlocal.glm.events import ContentDelta, Event, ReasoningDelta


def split_prompts(text: str, each_line: bool) -> list[str]:
    """Stdin to prompts: the whole text as one, or one per non-empty line."""
    if each_line:
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [text.strip()] if text.strip() else []


class PipedChat:
    """Non-interactive chat: each prompt's answer goes to `out` as plain text, problems to `err`."""

    def __init__(self, session: ChatSession, conversation: Conversation, *, out: TextIO, err: TextIO,
                 show_thinking: bool = False, max_tokens: int | None = None,
                 turn_kwargs: Mapping[str, object] | None = None):  # fmt: skip
        self.conv = conversation
        self.runner = TurnRunner(session, conversation, max_tokens, turn_kwargs)
        self.out, self.err = out, err
        self.show_thinking = show_thinking
        self.in_thinking = False
        self.started = False  # has this turn's answer printed anything yet

    def run(self, prompts: list[str]) -> int:
        """Answer each prompt in turn; returns the exit code (non-zero on the first error)."""
        if not prompts:
            self.err.write("error: no prompt on standard input\n")
            return 2
        for i, prompt in enumerate(prompts):
            if i:
                self.out.write("\n")
            self.conv.messages.append({"role": "user", "content": prompt})
            try:
                record = self.runner.run(threading.Event(), self.on_event)
            except GlmlocalError as e:
                self.err.write(f"error: {e.one_line()}\n")
                return e.exit_code
            self.conv.messages.append(record.message())
            code = self.after_turn(record)
            if code:
                return code
        return 0

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, ReasoningDelta):
            if self.show_thinking:
                self.out.write(ev.text if self.in_thinking else "<think>\n" + ev.text.lstrip())
                self.in_thinking = True
        else:
            if self.in_thinking:
                self.out.write("\n</think>\n\n")
                self.in_thinking = False
            if isinstance(ev, ContentDelta):
                text = ev.text if self.started else ev.text.lstrip()  # GLM opens answers with "\n"
                self.started = self.started or bool(text)
                self.out.write(text)
        self.out.flush()

    def after_turn(self, record: TurnRecord) -> int:
        self.started = False
        self.out.write("\n")
        self.out.flush()
        for call in record.calls:
            fn = call["function"]
            self.err.write(f"tool call {fn['name']}({fn['arguments']}) needs a terminal to answer; stopping\n")
        if record.calls:
            return 3
        if record.reason == "length":
            self.err.write("warning: the answer was cut off at the token limit\n")
        return 0
