"""prompt_toolkit input for `glmlocal chat`: history across runs, multi-line editing and paste.

Enter sends; Esc-Enter (what Alt-Enter sends in most terminals) inserts a newline; a bracketed paste keeps its
newlines without sending. Ctrl-C at the prompt clears the line (KeyboardInterrupt), Ctrl-D on an empty line
ends the chat (EOFError).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import Output


def default_history_path() -> Path:
    """`$GLMLOCAL_CHAT_HISTORY`, else `chat_history` in the store directory ($GLMLOCAL_HOME, ~/.cache/glmlocal)."""
    env = os.environ.get("GLMLOCAL_CHAT_HISTORY")
    if env:
        return Path(env).expanduser()
    from glmlocal.models.store import home

    return home() / "chat_history"


def _history(path: Path | None) -> History:
    if path is None:
        return InMemoryHistory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return FileHistory(str(path))
    except OSError:  # a read-only home must not stop the chat; history then lasts one run
        return InMemoryHistory()


class SlashCompleter(Completer):
    """Completes command names after a leading "/"; ordinary messages get no completion menu."""

    def __init__(self, commands: list[str]):
        self.commands = commands

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or " " in text or "\n" in text:
            return
        for cmd in self.commands:
            if cmd.startswith(text):
                yield Completion(cmd, start_position=-len(text))


def _bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return kb


class PromptReader:
    """Reads user lines with prompt_toolkit. Pass `input`/`output` (e.g. a pipe input) to drive it in tests."""

    def __init__(self, history_path: Path | None = None, *, input: Input | None = None, output: Output | None = None,
                 commands: list[str] | None = None):  # fmt: skip
        from glmlocal.chat.view import HELP

        names = commands or [cmd.split()[0] for cmd, _ in HELP]
        self.session: PromptSession[str] = PromptSession(
            history=_history(history_path), key_bindings=_bindings(), input=input, output=output,
            completer=SlashCompleter(names), complete_while_typing=True, auto_suggest=AutoSuggestFromHistory(),
        )  # fmt: skip
        # Tool results and confirmations get their own session so they stay out of the chat history.
        self.questions: PromptSession[str] = PromptSession(
            history=InMemoryHistory(), key_bindings=_bindings(), input=input, output=output
        )

    def read(self, status: str = "") -> str:
        """One user message. Raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
        return self.session.prompt(
            HTML("<b><ansicyan>›</ansicyan></b> "),
            prompt_continuation=lambda width, line_no, wrap: "  ",
            rprompt=HTML(f"<style fg='ansibrightblack'>{_escape(status)}</style>") if status else None,
        )

    def ask(self, question: str) -> str:
        """A one-off question (e.g. a tool result). Same key handling as `read`."""
        return self.questions.prompt(HTML(f"<ansiyellow>{_escape(question)}</ansiyellow> "))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
