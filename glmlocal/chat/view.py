"""Rich rendering for `glmlocal chat`: one streamed turn, the status line, help, placement and load progress.

Layout of a turn on screen: finished parts (the one-line thinking summary, completed Markdown blocks, tool-call
panels) are printed permanently, and only the part still growing (the thinking tail, the last Markdown block,
a tool call whose arguments are streaming) lives in a transient Live region under them. That keeps the Live
region small, so long answers scroll normally instead of being redrawn (or cropped) as one huge block.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.spinner import Spinner
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from glmlocal.engine.session import TurnResult
from glmlocal.glm.events import (
    ContentDelta,
    Event,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)

CODE_THEME = "monokai"
FENCES = ("```", "~~~")
REFRESH_HZ = 12
THINKING_LINES = 8  # the streaming thinking panel shows this many trailing lines


def stable_split(text: str) -> int:
    """Index up to which `text` is complete Markdown blocks: the last blank line outside a code fence."""
    in_fence, pos, cut = False, 0, 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        stripped = line.strip()
        if stripped.startswith(FENCES):
            in_fence = not in_fence
        elif not stripped and not in_fence and line.endswith("\n") and pos < len(text):
            cut = pos
    return cut


class TrimmedMarkdown:
    """Markdown without the blank lines Rich puts around some blocks (lists), so blocks printed one at a time
    are spaced like the whole document: exactly one blank line between them. Code-block padding is kept."""

    def __init__(self, text: str):
        self.markdown = Markdown(text, code_theme=CODE_THEME)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.markdown, options, pad=False)
        empty = [not "".join(seg.text for seg in line) for line in lines]
        start = empty.index(False) if False in empty else len(lines)
        end = len(lines) - (empty[::-1].index(False) if False in empty else 0)
        newline = Segment.line()
        for line in lines[start:end]:
            yield from line
            yield newline


def thinking_summary(n_tokens: int, seconds: float) -> Text:
    """The collapsed form of a reasoning block."""
    return Text.assemble(
        ("▸ ", "dim"),
        (f"Thought for {n_tokens} tokens / {seconds:.1f} s", "dim italic"),
        ("  (/show-thinking to expand)", "dim"),
    )


def thinking_panel(text: str, title: str = "thinking") -> Panel:
    return Panel(Text(text.strip(), style="dim italic"), title=title, title_align="left", border_style="dim")


def tool_call_panel(name: str, arguments: Mapping[str, object], call_id: str = "") -> Panel:
    body = Syntax(json.dumps(arguments, indent=2, ensure_ascii=False), "json", theme=CODE_THEME, word_wrap=True)
    return Panel(body, title=f"tool call: {name}", subtitle=call_id or None, title_align="left", border_style="cyan")


def status_line(usage: TurnResult, n_ctx: int | None) -> Text:
    """`12.3 tok/s · first token 0.41 s · context 812 / 4096 · cached 640 · 57 tokens · drafts 30/41 (73%)`: the last
    part with speculative decoding, drafted tokens the model accepted / drafted."""
    used = usage.prompt_tokens + usage.completion_tokens
    limit = f" / {n_ctx}" if n_ctx else ""
    parts = [
        f"{usage.tokens_per_s:.1f} tok/s",
        f"first token {usage.ttft_s:.2f} s",
        f"context {used}{limit}",
        f"cached {usage.cached_tokens}",
        f"{usage.completion_tokens} tokens",
    ]
    if usage.draft_n:
        parts.append(drafts_text(usage.draft_n_accepted, usage.draft_n))
    style = "yellow" if n_ctx and used > 0.9 * n_ctx else "dim"
    return Text(" · ".join(parts), style=style)


def drafts_text(accepted: int, drafted: int) -> str:
    return f"drafts {accepted}/{drafted} ({100 * accepted / drafted:.0f}%)" if drafted else "drafts 0"


class _LiveBody:
    """What the transient Live region shows; re-rendered from the view's state on every refresh."""

    def __init__(self, view: "TurnView"):
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        v = self.view
        height = max(4, (options.height or console.height) - 4)
        if v.thinking_open:
            lines = min(THINKING_LINES, height - 3)
            yield _tail_panel(console, "".join(v.reasoning), options.max_width, lines, v.elapsed_thinking())
        if v.content:
            yield TrimmedMarkdown(v.content)
        if v.open_call is not None:
            name, args = v.open_call
            yield Text(f"tool call: {name} {args[-200:]}", style="cyan")
        v.spinner.update(text=Text(f"{v.phase} · {v.elapsed():.1f} s · Ctrl-C stops", style="dim"))
        yield v.spinner  # one instance, so its animation advances between refreshes


def _tail_panel(console: Console, text: str, width: int, lines: int, seconds: float) -> Panel:
    # Only the end of a long reasoning block is shown while it streams; wrap just its last few KB.
    wrapped = Text(text[-6000:].strip(), style="dim italic").wrap(console, max(10, width - 4))
    tail = Text("\n").join(wrapped[-max(1, lines):]) if len(wrapped) else Text("")
    return Panel(tail, title=f"thinking… {seconds:.0f} s", title_align="left", border_style="dim")


class TurnView:
    """Renders the events of one assistant turn. Use as a context manager around the event loop."""

    def __init__(
        self,
        console: Console,
        *,
        show_thinking: bool = False,
        thinking_tokens: Callable[[], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console = console
        self.show_thinking = show_thinking
        self.thinking_tokens = thinking_tokens  # the session's live count of tokens generated while thinking
        self.clock = clock
        self.t0 = clock()
        self.reasoning: list[str] = []
        self.reasoning_events = 0
        self.thinking_open = False
        self.think_t0 = self.think_t1 = 0.0
        self.content = ""
        self.open_call: tuple[str, str] | None = None
        self.phase = "reading prompt"
        self.finished = False
        self.spinner = Spinner("dots")
        # Rich's own auto-refresh thread races with console.print from this thread (the live region is
        # then erased with a stale height, leaving blank lines), so one lock serialises our refreshes and prints.
        self.live = Live(_LiveBody(self), console=console, transient=True, auto_refresh=False)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="chat-live", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "TurnView":
        self.live.start()
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._ticker.join()
        with self.lock:
            self.live.stop()

    def _tick(self) -> None:
        while not self._stop.wait(1 / REFRESH_HZ):
            with self.lock:
                self.live.refresh()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def elapsed_thinking(self) -> float:
        return (self.think_t1 if not self.thinking_open else self.clock()) - self.think_t0

    # -- events -----------------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        """Update the screen for one parser event."""
        with self.lock:
            self._on_event(ev)

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, ReasoningDelta):
            self._on_reasoning(ev.text)
        elif isinstance(ev, ContentDelta):
            self._on_content(ev.text)
        elif isinstance(ev, ToolCallStart):
            self._close_thinking()
            self._flush_content()
            self.open_call = (ev.name, "")
            self.phase = f"calling {ev.name}"
        elif isinstance(ev, ToolCallArgsDelta) and self.open_call is not None:
            self.open_call = (self.open_call[0], self.open_call[1] + ev.text)
        elif isinstance(ev, ToolCallEnd):
            self.open_call = None
            self.console.print(tool_call_panel(ev.name, ev.arguments, ev.id))
        elif isinstance(ev, Finish):
            self._finish(ev.reason)

    def _on_reasoning(self, text: str) -> None:
        if not self.reasoning:
            self.thinking_open, self.think_t0 = True, self.clock()
            self.phase = "thinking"
        self.reasoning.append(text)
        self.reasoning_events += 1

    def _on_content(self, text: str) -> None:
        self._close_thinking()
        self.phase = "answering"
        # Blank lines before a block are dropped: GLM opens answers with "\n" after </think>, and the
        # spacing between printed blocks is ours (one blank line, as Markdown renders a whole document).
        self.content = (self.content + text).lstrip("\n") if not self.content.strip() else self.content + text
        cut = stable_split(self.content)
        if cut:
            done, self.content = self.content[:cut], self.content[cut:]
            if done.strip():
                self.console.print(TrimmedMarkdown(done))
                self.console.print()

    def _close_thinking(self) -> None:
        if not self.thinking_open:
            return
        self.thinking_open, self.think_t1 = False, self.clock()
        text = "".join(self.reasoning)
        if self.show_thinking:
            self.console.print(thinking_panel(text, f"thought for {self.think_t1 - self.think_t0:.1f} s"))
        else:
            self.console.print(thinking_summary(self.reasoning_tokens(), self.think_t1 - self.think_t0))

    def _flush_content(self) -> None:
        if self.content.strip():
            self.console.print(TrimmedMarkdown(self.content))
        self.content = ""

    def reasoning_tokens(self) -> int:
        """Tokens of thinking as the engine generated them (the session counts them), else one per delta."""
        n = self.thinking_tokens() if self.thinking_tokens is not None else None
        return n if n else self.reasoning_events

    def finish(self, reason: str) -> None:
        """Close everything still open and say why the turn ended, when that is not obvious."""
        with self.lock:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._close_thinking()
        self._flush_content()
        if self.open_call is not None:  # a call without its end is never run (see glm/events.py)
            self.console.print(Text(f"tool call {self.open_call[0]} was cut off and is dropped", style="yellow"))
        self.open_call = None
        if reason == "cancelled":
            self.console.print(Text("⏹ stopped (Ctrl-C)", style="yellow"))
        elif reason == "length":
            self.console.print(Text("⏹ stopped at the token limit", style="yellow"))


# -- other screens --------------------------------------------------------------------------------
HELP = [
    ("/help", "this help"),
    ("/think on|off|N", "turn thinking on or off for the next turns; N: think at most N tokens per reply"),
    ("/show-thinking", "show the last turn's full thinking"),
    ("/system [TEXT]", "show or set the system prompt (\"/system -\" removes it)"),
    ("/clear", "forget the conversation (system prompt and tools stay)"),
    ("/drop N", "drop the oldest N turns to free context"),
    ("/retry", "send the last message again"),
    ("/save FILE", "save the conversation as JSON (an OpenAI chat-completions request body)"),
    ("/load FILE", "load a saved conversation or any chat-completions request body"),
    ("/stats", "token counts, speed and context use"),
    ("/exit", "quit (also Ctrl-D)"),
]

KEYS = "Enter sends · Esc-Enter (Alt-Enter) or a paste adds newlines · Ctrl-C stops a reply · Ctrl-D quits"


def help_table() -> Group:
    table = Table(show_header=False, box=None, padding=(0, 2))
    for cmd, what in HELP:
        table.add_row(Text(cmd, style="bold cyan"), what)
    return Group(table, Text(KEYS, style="dim"))


def stats_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    for key, value in rows:
        table.add_row(Text(key, style="dim"), value)
    return table
