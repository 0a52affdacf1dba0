"""`glmlocal chat`: the interactive REPL (prompt_toolkit in, Rich out).

Presentation only: a turn is `session.turn(messages, ...)` from glmlocal/engine/session.py, the same code the
server uses. The REPL takes its session, console and input reader as arguments so tests can drive it. Piped use
is in piped.py, start-up (resolve, plan, load) in glmlocal/launch.py, rendering in view.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

from glmlocal.chat.input import PromptReader
from glmlocal.chat.transcript import Conversation, ToolCall
from glmlocal.chat.turn import (
    ChatSession,
    TurnRecord,
    TurnRunner,
    cancel_on_sigint,
    quiet_tty,
)
from glmlocal.chat.view import (
    TurnView,
    drafts_text,
    help_table,
    stats_table,
    status_line,
    thinking_panel,
)
from glmlocal.engine.session import TurnResult
from glmlocal.errors import ContextOverflowError, GlmlocalError

SKIPPED_TOOL = "The user skipped this tool call; no result is available."


class ChatREPL:
    """The interactive chat: `reader` reads the user's lines, `session` answers them."""

    def __init__(
        self,
        session: ChatSession,
        conversation: Conversation,
        *,
        console: Console,
        reader: PromptReader,
        n_ctx: int | None = None,
        show_thinking: bool = False,
        max_tokens: int | None = None,
        info: list[tuple[str, str]] | None = None,
        turn_kwargs: Mapping[str, object] | None = None,
        autosave: Path | None = None,
    ):
        self.conv = conversation
        self.runner = TurnRunner(session, conversation, max_tokens, turn_kwargs)
        self.console = console
        self.reader = reader
        self.n_ctx = n_ctx
        self.show_thinking = show_thinking
        self.info = info or []
        self.autosave = autosave  # the conversation is written here after every command and turn
        self.last_reasoning = ""
        self.last_usage: TurnResult | None = None
        self.pending: str | None = None  # a message that did not fit, kept for /retry
        self.totals = {"turns": 0, "prompt": 0, "cached": 0, "completion": 0, "seconds": 0.0, "drafted": 0,
                       "accepted": 0}
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "help": self.cmd_help, "?": self.cmd_help, "think": self.cmd_think,
            "show-thinking": self.cmd_show_thinking, "system": self.cmd_system, "clear": self.cmd_clear,
            "drop": self.cmd_drop, "retry": self.cmd_retry, "save": self.cmd_save, "load": self.cmd_load,
            "stats": self.cmd_stats, "exit": self.cmd_exit, "quit": self.cmd_exit,
        }  # fmt: skip

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        """Read and answer until /exit or Ctrl-D. Returns the process exit code."""
        self.console.print(Text(f"glmlocal chat · {self.conv.model} · /help for commands · Ctrl-D quits", "dim"))
        if self.conv.messages:
            self.console.print(Text(f"resumed a conversation of {self.conv.n_turns} turn(s)", "dim"))
            self.show_last_answer()
        while True:
            try:
                line = self.reader.read(self.prompt_status())
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line, like a shell
            except EOFError:
                break
            try:
                if not self.handle(line):
                    break
            except KeyboardInterrupt:  # Ctrl-C outside a generation (e.g. during /load): back to the prompt
                self.take_back_user_message()  # never leave a user message without its answer
                retry = "; /retry sends your message again" if self.pending else ""
                self.console.print(Text(f"interrupted{retry}", style="yellow"))
            self.save_auto()
        if self.autosave is not None and self.conv.messages:
            self.console.print(Text(f"conversation saved to {self.autosave} (--resume continues it)", "dim"))
        return 0

    def save_auto(self) -> None:
        """Keep the on-disk copy current, so no crash or closed terminal loses the conversation."""
        if self.autosave is None or not (self.conv.messages or self.conv.system):
            return
        try:
            self.conv.save(self.autosave)
        except GlmlocalError as e:
            self.console.print(Text(f"warning: autosave off: {e.one_line()}", style="yellow"))
            self.autosave = None

    def prompt_status(self) -> str:
        budget = f" ≤{self.conv.think_budget}" if self.conv.think_budget else ""
        think = f"think on{budget}" if self.conv.enable_thinking else "think off"
        if self.last_usage is None or not self.n_ctx:
            return think
        return f"{think} · ctx {self.context_used()}/{self.n_ctx}"

    def handle(self, line: str) -> bool:
        """Act on one input line; False means quit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        self.send(line.lstrip()[1:] if text.startswith("//") else line)  # "//x" sends "/x"
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text[1:].partition(" ")
        name = name.lower()
        if not name:  # a lone "/"
            self.cmd_help("")
            return True
        # An unambiguous prefix works too: /sta is /stats, /sh is /show-thinking.
        matches = [name] if name in self.commands else [c for c in self.commands if c.startswith(name)]
        if len({self.commands[c] for c in matches}) != 1:
            what = "ambiguous" if matches else "unknown"
            self.console.print(Text(f"{what} command /{name}", style="yellow"))
            self.console.print(help_table())
            return True
        return self.commands[matches[0]](arg.strip()) is not False

    # -- turns ------------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        """Append a user message and answer it (continuing through tool calls)."""
        self.pending = None
        self.conv.messages.append({"role": "user", "content": text})
        self.answer()

    def answer(self) -> None:
        while True:
            record = self.stream_turn()
            if record is None or record.reason != "tool_calls" or not record.calls:
                return
            if not self.answer_tool_calls(record.calls):
                return

    def stream_turn(self) -> TurnRecord | None:
        """One model turn on screen. Returns None when it failed (the error was shown).

        Ctrl-C cancels the turn from before the live view starts until the status line is printed (it never
        raises in between, which could leave a spinner on screen or a turn half recorded)."""
        cancel = threading.Event()
        view = TurnView(self.console, show_thinking=self.show_thinking, thinking_tokens=self.runner.thinking_tokens)
        with cancel_on_sigint(cancel):
            try:
                with quiet_tty(), view:
                    record = self.runner.run(cancel, view.on_event)
                    view.finish(record.reason)  # idempotent; covers a session that ends without Finish
            except ContextOverflowError as e:
                self.on_overflow(e)
                return None
            except GlmlocalError as e:
                self.take_back_user_message()
                self.console.print(Text(f"error: {e.one_line()}", style="red"))
                return None
            except Exception as e:  # a bug must not cost the user the conversation
                self.take_back_user_message()
                self.console.print(Text(f"internal error: {type(e).__name__}: {e} (the conversation is kept; "
                                        "/save it and report the bug)", style="red"))  # fmt: skip
                return None
            return self.keep(record)

    def keep(self, record: TurnRecord) -> TurnRecord:
        """Store the assistant message (also a partial, interrupted one) and show the status line."""
        if record.reason == "cancelled" and record.empty:
            self.take_back_user_message()
            self.console.print(Text("nothing was generated; /retry sends the message again", style="dim"))
            return record
        self.conv.messages.append(record.message())
        self.last_reasoning = record.reasoning.strip() or self.last_reasoning
        if record.usage is not None:
            self.last_usage = record.usage
            self.add_totals(record.usage)
            self.console.print(status_line(record.usage, self.n_ctx))
        if record.reason == "length" and self.context_used() >= (self.n_ctx or 1 << 62) - 1:
            self.console.print(Panel(Text.assemble(
                "The reply filled the context. ", ("/drop N", "bold cyan"), " drops the oldest turns, ",
                ("/clear", "bold cyan"), " starts over."), title="context full", title_align="left",
                border_style="yellow"))  # fmt: skip
        return record

    def context_used(self) -> int:
        if self.last_usage is None:
            return 0
        return self.last_usage.prompt_tokens + self.last_usage.completion_tokens

    def add_totals(self, usage: TurnResult) -> None:
        t = self.totals
        t["turns"] += 1
        t["prompt"] += usage.prompt_tokens
        t["cached"] += usage.cached_tokens
        t["completion"] += usage.completion_tokens
        t["seconds"] += usage.completion_tokens / usage.tokens_per_s if usage.tokens_per_s else 0.0
        t["drafted"] += usage.draft_n
        t["accepted"] += usage.draft_n_accepted

    def take_back_user_message(self) -> None:
        """An unanswered user message leaves the history (so it stays valid) and waits for /retry."""
        if self.conv.messages and self.conv.messages[-1].get("role") == "user":
            self.pending = self.conv.messages.pop()["content"]

    def on_overflow(self, e: ContextOverflowError) -> None:
        self.take_back_user_message()
        body = Text.assemble(
            (f"{e.one_line()}\n", "bold"),
            f"The conversation has {self.conv.n_turns} turn(s). Free space with ",
            ("/drop N", "bold cyan"), " (drop the oldest N turns) or ", ("/clear", "bold cyan"),
            ", then ", ("/retry", "bold cyan"), " sends your message again. Nothing was truncated.",
        )  # fmt: skip
        self.console.print(Panel(body, title="context full", title_align="left", border_style="yellow"))

    def answer_tool_calls(self, calls: list[ToolCall]) -> bool:
        """Ask the user for each call's result. False when they stopped (Ctrl-C / Ctrl-D) instead."""
        self.console.print(Text("The model called a tool. Type its result (Enter skips, Ctrl-C stops).", "dim"))
        go_on = True
        for call in calls:
            name, content = call["function"]["name"], SKIPPED_TOOL
            if go_on:
                try:
                    content = self.reader.ask(f"result of {name}:").strip() or SKIPPED_TOOL
                except (KeyboardInterrupt, EOFError):
                    go_on = False
            self.conv.messages.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": content})
        return go_on

    # -- commands ---------------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        self.console.print(help_table())

    def cmd_exit(self, arg: str) -> bool:
        return False

    def cmd_think(self, arg: str) -> None:
        """/think on (no budget), /think N (at most N tokens of thinking per reply), /think off."""
        if arg.lower() in ("on", "off"):
            self.conv.enable_thinking, self.conv.think_budget = arg.lower() == "on", None
        elif arg.isdecimal() and int(arg) > 0:  # isdigit() would pass "²", which int() refuses
            self.conv.enable_thinking, self.conv.think_budget = True, int(arg)
        elif arg:
            self.console.print(Text("usage: /think on|off|N (N: most tokens to think per reply, at least 1)",
                                    style="yellow"))
            return
        self.console.print(Text(f"thinking is {'on' if self.conv.enable_thinking else 'off'}", style="dim"))

    def cmd_show_thinking(self, arg: str) -> None:
        if not self.last_reasoning:
            self.console.print(Text("no thinking to show yet", style="dim"))
        else:
            self.console.print(thinking_panel(self.last_reasoning, "last thinking"))

    def cmd_system(self, arg: str) -> None:
        if arg == "-":
            self.conv.system = None
        elif arg:
            self.conv.system = arg
        shown = self.conv.system if self.conv.system is not None else "(none)"
        self.console.print(Text.assemble(("system prompt: ", "dim"), shown))

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        self.last_usage = None
        self.console.print(Text("conversation cleared", style="dim"))

    def cmd_drop(self, arg: str) -> None:
        try:
            n = int(arg or "1")
        except ValueError:
            self.console.print(Text("usage: /drop N (drop the oldest N turns)", style="yellow"))
            return
        dropped = self.conv.drop_oldest(n)
        self.console.print(Text(f"dropped {dropped} turn(s); {self.conv.n_turns} left", style="dim"))

    def cmd_retry(self, arg: str) -> None:
        msgs = self.conv.messages
        if self.pending is not None:
            self.send(self.pending)
        elif msgs and msgs[-1].get("role") in ("user", "tool"):
            self.answer()
        elif self.conv.turn_starts():
            start = self.conv.turn_starts()[-1]
            text = msgs[start]["content"]
            del msgs[start:]
            self.send(text)
        else:
            self.console.print(Text("nothing to retry", style="dim"))

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.console.print(Text("usage: /save FILE", style="yellow"))
            return
        try:
            self.conv.save(Path(arg))
        except GlmlocalError as e:
            self.console.print(Text(f"error: {e.one_line()}", style="red"))
            return
        self.console.print(Text(f"saved {len(self.conv.messages)} messages to {arg}", style="dim"))

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.console.print(Text("usage: /load FILE", style="yellow"))
            return
        try:
            loaded = Conversation.load(Path(arg))
        except GlmlocalError as e:
            self.console.print(Text(f"error: {e.one_line()}", style="red"))
            return
        self.conv.system, self.conv.messages = loaded.system, loaded.messages
        self.conv.enable_thinking, self.conv.think_budget = loaded.enable_thinking, loaded.think_budget
        self.conv.tools = loaded.tools or self.conv.tools
        self.last_usage, self.pending = None, None
        self.console.print(Text(f"loaded {len(loaded.messages)} messages ({loaded.n_turns} turns) from {arg}", "dim"))
        self.show_last_answer()

    def show_last_answer(self) -> None:
        """After /load or --resume: the last question and answer, so the user knows where they are."""
        starts = self.conv.turn_starts()
        if not starts:
            return
        question = str(self.conv.messages[starts[-1]].get("content") or "")
        self.console.print(Text(f"› {question[:300]}" + ("…" if len(question) > 300 else ""), style="dim"))
        for msg in reversed(self.conv.messages[starts[-1]:]):
            if msg.get("role") == "assistant" and msg.get("content"):
                self.console.print(Panel(Markdown(msg["content"]), title="last answer", title_align="left"))
                return

    def cmd_stats(self, arg: str) -> None:
        t = self.totals
        rows = list(self.info) + [
            ("turns", f"{self.conv.n_turns} in history, {t['turns']} generated this run"),
            ("tokens", f"{t['prompt']} prompt ({t['cached']} from cache), {t['completion']} generated"),
        ]
        if t["seconds"]:
            rows.append(("average speed", f"{t['completion'] / t['seconds']:.1f} tok/s"))
        if t["drafted"]:
            rows.append(("speculative", f"{drafts_text(t['accepted'], t['drafted'])} accepted this run"))
        if self.last_usage is not None:
            rows.append(("last turn", status_line(self.last_usage, self.n_ctx).plain))
        self.console.print(stats_table(rows))
