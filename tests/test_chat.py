"""REPL logic of `glmlocal chat` against a scripted fake session (unit tests only).

The real prompt_toolkit reader (fed through a pipe input) and the real Rich console drive the REPL; their
combined terminal output is replayed into a pyte terminal emulator, so the assertions are about what a
person would see. tests/test_chat_engine.py runs the same REPL against the real engine and a fixture GGUF.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from pathlib import Path

import pyte
import pytest
from prompt_toolkit.data_structures import Size
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.vt100 import Vt100_Output
from rich.console import Console

from glmlocal.chat.input import PromptReader, SlashCompleter
from glmlocal.chat.piped import PipedChat, split_prompts
from glmlocal.chat.repl import ChatREPL
from glmlocal.chat.transcript import (
    Conversation,
    latest_chat,
    load_tools,
    new_chat_path,
)
from glmlocal.chat.view import HELP, TrimmedMarkdown, stable_split
from glmlocal.engine.session import TurnResult
from glmlocal.errors import ContextOverflowError, InputError
from glmlocal.glm.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)

ENTER, ESC_ENTER, CTRL_D, UP = "\r", "\x1b\r", "\x04", "\x1b[A"


# -- harness (also used by test_chat_engine.py) -------------------------------------------------------
class Terminal:
    """One fake terminal: prompt_toolkit and Rich both write into it; pyte shows what is on screen."""

    def __init__(self, width: int = 100, height: int = 40):
        self.width, self.height = width, height
        self.buf = io.StringIO()
        self.console = Console(file=self.buf, force_terminal=True, width=width, height=height)
        self.output = Vt100_Output(self.buf, lambda: Size(rows=height, columns=width), term="xterm", enable_cpr=False)

    def lines(self) -> list[str]:
        """Every line that scrolled by plus the final screen, as plain text."""
        screen = pyte.HistoryScreen(self.width, self.height, history=5000)
        screen.set_mode(pyte.modes.LNM)  # a tty turns "\n" into "\r\n"
        pyte.Stream(screen).feed(self.buf.getvalue())
        top = ["".join(line[x].data for x in range(self.width)) for line in screen.history.top]
        return [line.rstrip() for line in top + list(screen.display)]

    def text(self) -> str:
        return "\n".join(self.lines()).rstrip()

    def flat(self) -> str:
        """The text with every run of whitespace (line wraps included) turned into one space."""
        return " ".join(self.text().split())


def drive(session, keys: str, *, conv: Conversation | None = None, history: Path | None = None,
          term: Terminal | None = None, **kwargs) -> tuple[ChatREPL, Terminal]:  # fmt: skip
    """Type `keys` into a real ChatREPL (all typed ahead, prompt_toolkit queues them) and run it to the end."""
    term = term or Terminal()
    with create_pipe_input() as inp:
        inp.send_text(keys)
        reader = PromptReader(history, input=inp, output=term.output)
        repl = ChatREPL(session, conv or Conversation(model="fake"), console=term.console, reader=reader, **kwargs)
        code = repl.run()
    assert code == 0
    return repl, term


# -- the fake session ----------------------------------------------------------------------------------
def usage(prompt: int, cached: int, completion: int, ttft: float, tps: float) -> TurnResult:
    return TurnResult("stop", prompt, cached, completion, ttft, tps)


class FakeStream:
    """What Session.turn returns (chat.turn.TurnItems), over a scripted generator. It counts no thinking
    tokens, so the view falls back to counting reasoning deltas."""

    reasoning_tokens = 0

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return self.items

    def close(self):
        self.items.close()


class FakeSession:
    """Plays scripted turns: each script is a list of events (or the string "SIGINT" = the user's Ctrl-C)."""

    def __init__(self, *scripts, delay: float = 0.0, max_messages: int | None = None):
        self.scripts = list(scripts)
        self.calls: list[dict] = []
        self.delay = delay
        self.max_messages = max_messages

    def turn(self, messages, tools=None, *, enable_thinking=True, cancel=None, max_tokens=None, think_budget=None):
        return FakeStream(self._play(messages, tools, enable_thinking, cancel, think_budget))

    def _play(self, messages, tools, enable_thinking, cancel, think_budget=None):
        self.calls.append({"messages": [dict(m) for m in messages], "tools": tools, "thinking": enable_thinking,
                           "budget": think_budget})
        if self.max_messages is not None and len(messages) > self.max_messages:
            raise ContextOverflowError(len(messages) * 100, 64, self.max_messages * 100)
        n = 0
        for ev in self.scripts.pop(0):
            time.sleep(self.delay)
            if isinstance(ev, BaseException):  # KeyboardInterrupt too: a Ctrl-C that escaped the handler
                raise ev
            if ev == "SIGINT":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs between bytecodes; give it a moment
                continue
            if cancel is not None and cancel.is_set():
                yield Finish("cancelled")
                yield usage(len(messages) * 10, 0, n, 0.05, 50.0)
                return
            n += 1
            yield ev
        yield usage(len(messages) * 10, 5, n, 0.25, 42.5)  # like Session: events, then the usage


def answer(text: str, thinking: str = "") -> list:
    evs = [ReasoningDelta(w) for w in re.findall(r"\S+\s*", thinking)]
    evs += [ContentDelta("\n")] + [ContentDelta(piece) for piece in text.split("|")]
    return evs + [Finish("stop")]


# -- streaming and thinking ----------------------------------------------------------------------------
def test_streamed_markdown_collapsed_thinking_and_status_line():
    script = answer("## Result\n\n|Use `sum`:\n\n```python\n|print(sum([1, 2]))\n|```\n\nDone|.",
                    thinking="I should add the numbers carefully")  # fmt: skip
    session = FakeSession(script)
    repl, term = drive(session, "add 1 and 2" + ENTER + CTRL_D, n_ctx=2048)
    text = term.text()
    assert "› add 1 and 2" in text
    assert "▸ Thought for 6 tokens" in text  # collapsed to one line...
    assert "carefully" not in text  # ...and the streamed thinking panel is gone from the screen
    assert "Result" in text and "print(sum([1, 2]))" in text and "Done." in text
    assert "```" not in text  # rendered as Markdown, not raw
    assert "42.5 tok/s · first token 0.25 s · context 23 / 2048 · cached 5 · 13 tokens" in text
    msg = repl.conv.messages[-1]
    assert msg["reasoning_content"] == "I should add the numbers carefully"
    assert msg["content"].startswith("## Result") and msg["content"].endswith("Done.")


def test_streamed_blocks_are_spaced_like_the_whole_document():
    text = "## Plan\n\n|Here is |a plan:\n\n|1. first\n|2. second\n\n|```python\n|x = 1\n|```\n\n|Done|."
    session = FakeSession(answer(text, thinking="hmm"), delay=0.03)  # slow enough for live refreshes in between
    repl, term = drive(session, "plan?" + ENTER + CTRL_D, term=Terminal(80, 30))
    lines = term.lines()
    start = next(i for i, line in enumerate(lines) if "Thought for" in line) + 1
    end = next(i for i, line in enumerate(lines) if "tok/s" in line)
    whole = Console(file=io.StringIO(), width=80, force_terminal=True)
    with whole.capture() as cap:
        whole.print(TrimmedMarkdown(repl.conv.messages[-1]["content"]))
    expected = [line.rstrip() for line in pyte_lines(cap.get(), 80)]
    assert lines[start:end] == expected


def pyte_lines(ansi: str, width: int) -> list[str]:
    screen = pyte.Screen(width, 100)
    screen.set_mode(pyte.modes.LNM)
    pyte.Stream(screen).feed(ansi)
    return [line.rstrip() for line in screen.display][: screen.cursor.y]


def test_show_thinking_expands_the_last_one():
    session = FakeSession(answer("Four.", thinking="two plus two"))
    _, term = drive(session, "2+2?" + ENTER + "/show-thinking" + ENTER + CTRL_D)
    lines = term.lines()
    at = next(i for i, line in enumerate(lines) if "/show-thinking" in line)
    assert "two plus two" not in "\n".join(lines[:at])
    assert "two plus two" in "\n".join(lines[at:]) and "last thinking" in "\n".join(lines[at:])


def test_show_thinking_flag_keeps_thinking_expanded():
    _, term = drive(FakeSession(answer("Four.", thinking="two plus two")), "2+2?" + ENTER + CTRL_D, show_thinking=True)
    assert "two plus two" in term.text() and "thought for" in term.text()


def test_thinking_off_reaches_the_session():
    session = FakeSession(answer("a"), answer("b"))
    drive(session, "/think off" + ENTER + "x" + ENTER + "/think on" + ENTER + "y" + ENTER + CTRL_D)
    assert [c["thinking"] for c in session.calls] == [False, True]


def test_think_n_sets_a_budget_per_reply_and_bad_values_are_refused():
    session = FakeSession(answer("a"), answer("b"), answer("c"))
    keys = ("/think 64" + ENTER + "x" + ENTER + "/think -3" + ENTER + "/think lots" + ENTER + "/think 0" + ENTER
            + "/think ²" + ENTER + "y" + ENTER + "/think on" + ENTER + "z" + ENTER + CTRL_D)
    repl, term = drive(session, keys)
    assert [(c["thinking"], c["budget"]) for c in session.calls] == [(True, 64), (True, 64), (True, None)]
    assert term.text().count("usage: /think on|off|N") == 4  # "²" is a digit to str.isdigit, not to int()
    conv = Conversation(think_budget=16)
    repl, term = drive(FakeSession(answer("a")), "x" + ENTER + CTRL_D, conv=conv)
    assert repl.prompt_status().startswith("think on ≤16")


def test_a_think_budget_survives_save_and_load(tmp_path):
    conv = Conversation(messages=[{"role": "user", "content": "x"}], think_budget=256)
    conv.save(tmp_path / "c.json")
    body = json.loads((tmp_path / "c.json").read_text())
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "thinking_budget": 256}
    assert Conversation.load(tmp_path / "c.json").think_budget == 256
    for bad in (0, -1, 2.5, "64", True):
        body["chat_template_kwargs"]["thinking_budget"] = bad
        with pytest.raises(InputError, match="thinking_budget must be a whole number"):
            Conversation.from_request(body)


def test_stable_split_never_cuts_inside_a_code_fence():
    assert stable_split("para one\n\npara two") == len("para one\n\n")
    assert stable_split("```\ncode\n\nmore code\n") == 0
    assert stable_split("```\na\n\nb\n```\n\nafter") == len("```\na\n\nb\n```\n\n")
    assert stable_split("no blank line yet\n") == 0


# -- interrupt ------------------------------------------------------------------------------------------
def test_ctrl_c_stops_the_generation_and_the_repl_goes_on():
    long = [ContentDelta("\n")] + [ContentDelta(f"word{i} ") for i in range(5)] + ["SIGINT"]
    long += [ContentDelta(f"late{i} ") for i in range(50)] + [Finish("stop")]
    session = FakeSession(long, answer("second answer"), delay=0.01)
    # The handler that was there before: Python's default in a foreground pytest, SIG_IGN when pytest was started
    # in the background (`setsid ... &`, nohup), which ignores SIGINT from the start.
    before = signal.getsignal(signal.SIGINT)
    repl, term = drive(session, "tell me a long story" + ENTER + "next" + ENTER + CTRL_D)
    text = term.text()
    assert "word4" in text and "late" not in text
    assert "stopped (Ctrl-C)" in text
    assert "second answer" in text  # the REPL kept going after the interrupt
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    partial = repl.conv.messages[1]
    assert partial["role"] == "assistant" and partial["content"] == "word0 word1 word2 word3 word4"


def test_ctrl_c_before_any_output_takes_the_message_back_for_retry():
    session = FakeSession(["SIGINT", ContentDelta("never")], answer("retried answer"))
    repl, term = drive(session, "question" + ENTER + "/retry" + ENTER + CTRL_D)
    assert "nothing was generated" in term.text() and "retried answer" in term.text()
    assert [m["role"] for m in repl.conv.messages] == ["user", "assistant"]
    assert session.calls[1]["messages"][-1]["content"] == "question"


def test_an_interrupt_escaping_a_turn_never_leaves_an_unanswered_message():
    """A KeyboardInterrupt that gets past the turn's SIGINT handler (a signal racing its installation)
    must not leave the user's message in the history without an answer: it waits for /retry."""
    session = FakeSession([ContentDelta("\nhalf"), KeyboardInterrupt()], answer("retried answer"))
    repl, term = drive(session, "question" + ENTER + "/retry" + ENTER + CTRL_D)
    assert "interrupted; /retry sends your message again" in term.flat() and "retried answer" in term.text()
    assert [m["content"] for m in repl.conv.messages] == ["question", "retried answer"]


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_quits():
    session = FakeSession(answer("ok"))
    repl, _ = drive(session, "half typed\x03" + "real question" + ENTER + CTRL_D)
    assert [m["content"] for m in repl.conv.messages if m["role"] == "user"] == ["real question"]


def test_a_failing_turn_keeps_the_conversation_and_the_repl():
    session = FakeSession(answer("first"), [ContentDelta("\npartial"), RuntimeError("boom")], answer("third"))
    repl, term = drive(session, "one" + ENTER + "two" + ENTER + "/retry" + ENTER + CTRL_D)
    assert "internal error: RuntimeError: boom" in term.flat() and "third" in term.text()
    assert [m["content"] for m in repl.conv.messages] == ["one", "first", "two", "third"]


# -- commands -------------------------------------------------------------------------------------------
def test_unknown_command_gets_help_not_a_crash():
    session = FakeSession(answer("still here"))
    _, term = drive(session, "/frobnicate now" + ENTER + "hi" + ENTER + CTRL_D)
    text = term.text()
    assert "unknown command /frobnicate" in text and "/save FILE" in text and "still here" in text


def test_command_prefixes_and_tab_completion():
    session = FakeSession(answer("a"))
    repl, term = drive(session, "hi" + ENTER + "/sta" + ENTER + "/s" + ENTER + "/t off" + ENTER + CTRL_D)
    text = term.text()
    assert "1 generated this run" in text and "ambiguous command /s" in text and "thinking is off" in text
    names = [c.split()[0] for c, _ in HELP]
    complete = SlashCompleter(names).get_completions
    assert [c.text for c in complete(Document("/sh"), None)] == ["/show-thinking"]
    assert [c.text for c in complete(Document("/s"), None)] == ["/show-thinking", "/system", "/save", "/stats"]
    assert list(complete(Document("hello /s"), None)) == [] and list(complete(Document("/save x"), None)) == []


def test_double_slash_sends_a_message_starting_with_slash():
    session = FakeSession(answer("a path"))
    repl, _ = drive(session, "//etc/hosts is what?" + ENTER + CTRL_D)
    assert repl.conv.messages[0]["content"] == "/etc/hosts is what?"


def test_loaded_content_parts_are_flattened_as_the_template_reads_them():
    parts = [{"type": "text", "text": "Look: "}, "at ", {"type": "image_url", "image_url": {"url": "x"}},
             {"text": "this"}]
    conv = Conversation.from_request({"messages": [{"role": "system", "content": parts},
                                                   {"role": "user", "content": parts}]})
    assert conv.system == conv.messages[0]["content"] == "Look: at this"


def test_save_then_load_round_trip(tmp_path):
    path = tmp_path / "chat.json"
    session = FakeSession(answer("first answer", thinking="hmm"), answer("second answer"))
    keys = "/system Be brief." + ENTER + "one" + ENTER + "two" + ENTER + f"/save {path}" + ENTER + CTRL_D
    repl, term = drive(session, keys)
    assert f"saved 4 messages to {path}" in term.flat()
    body = json.loads(path.read_text())
    assert body["model"] == "fake" and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert body["messages"][0]["content"] == "Be brief."
    assert not list(tmp_path.glob("*.part"))

    session2 = FakeSession(answer("third answer"))
    repl2, term2 = drive(session2, "/clear" + ENTER + f"/load {path}" + ENTER + "three" + ENTER + CTRL_D)
    assert "loaded 4 messages (2 turns)" in term2.flat() and "second answer" in term2.text()
    sent = session2.calls[0]["messages"]
    assert sent[:5] == body["messages"] and sent[5] == {"role": "user", "content": "three"}
    assert repl2.conv.system == "Be brief."


def test_autosave_after_every_turn_and_resume(tmp_path):
    path = tmp_path / "chats" / "c.json"
    path.parent.mkdir()
    session = FakeSession(answer("first answer"), answer("second answer"))
    _, term = drive(session, "/system Terse." + ENTER + "q1" + ENTER + CTRL_D, autosave=path)
    assert "conversation saved to" in term.flat() and "--resume continues it" in term.flat()
    saved = json.loads(path.read_text())
    assert [m["content"] for m in saved["messages"]] == ["Terse.", "q1", "first answer"]
    repl, term2 = drive(session, "q2" + ENTER + CTRL_D, conv=Conversation.load(path), autosave=path)
    assert "resumed a conversation of 1 turn(s)" in term2.text() and "first answer" in term2.text()
    assert [m["content"] for m in session.calls[1]["messages"]] == ["Terse.", "q1", "first answer", "q2"]
    assert len(json.loads(path.read_text())["messages"]) == 5


def test_chat_files_are_unique_and_the_latest_is_found(tmp_path):
    assert latest_chat(tmp_path / "none") is None
    a = new_chat_path(tmp_path)
    a.write_text("{}")
    b = new_chat_path(tmp_path)
    assert a != b and b.parent == tmp_path
    b.write_text("{}")
    os.utime(a, ns=(1, 1))
    assert latest_chat(tmp_path) == b


def test_load_of_a_bad_file_is_one_line_and_the_chat_goes_on(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    session = FakeSession(answer("fine"))
    keys = f"/load {bad}" + ENTER + f"/load {tmp_path / 'missing.json'}" + ENTER + "q" + ENTER + CTRL_D
    _, term = drive(session, keys)
    text = term.flat()
    assert "message 0 needs a role" in text and "cannot read" in text and "fine" in text


def test_system_clear_drop_and_stats():
    session = FakeSession(answer("a1"), answer("a2"), answer("a3"), answer("a4"))
    keys = "/system You are terse." + ENTER + "q1" + ENTER + "q2" + ENTER + "q3" + ENTER
    keys += "/drop 2" + ENTER + "q4" + ENTER + "/stats" + ENTER + "/clear" + ENTER + CTRL_D
    repl, term = drive(session, keys, n_ctx=4096, info=[("model", "fake.gguf")])
    sent = session.calls[3]["messages"]
    assert [m["content"] for m in sent] == ["You are terse.", "q3", "a3", "q4"]
    text = term.text()
    assert "dropped 2 turn(s); 1 left" in text
    assert "fake.gguf" in text and "4 generated this run" in text and "tok/s" in text
    assert repl.conv.messages == [] and repl.conv.system == "You are terse."


def test_context_full_offers_drop_and_clear_and_never_truncates():
    session = FakeSession(answer("a1"), answer("a2"), answer("a3"), max_messages=4)
    keys = "q1" + ENTER + "q2" + ENTER + "q3" + ENTER + "/drop 1" + ENTER + "/retry" + ENTER + CTRL_D
    repl, term = drive(session, keys)
    text = term.text()
    assert "context full" in text and "/drop N" in text and "/clear" in text and "Nothing was truncated" in text
    # the overflowing request was refused whole; after /drop 1, /retry sent q3 with q2's turn intact
    assert [m["content"] for m in session.calls[-1]["messages"]] == ["q2", "a2", "q3"]
    assert [m["content"] for m in repl.conv.messages] == ["q2", "a2", "q3", "a3"]


# -- tools ----------------------------------------------------------------------------------------------
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


def tool_call_turn(city: str = "Paris") -> list:
    args = json.dumps({"city": city})
    return [ReasoningDelta("need weather"), ContentDelta("\nLet me check."),
            ToolCallStart(0, "call_abc", "get_weather"),
            ToolCallArgsDelta(0, args[:5]), ToolCallArgsDelta(0, args[5:]),
            ToolCallEnd(0, "get_weather", {"city": city}, "call_abc"), Finish("tool_calls")]  # fmt: skip


def test_tool_call_is_shown_and_the_users_result_continues_the_turn(tmp_path):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(WEATHER))
    conv = Conversation(model="fake", tools=load_tools(tools_file))
    session = FakeSession(tool_call_turn(), answer("It is 21 C in Paris."))
    repl, term = drive(session, "weather in Paris?" + ENTER + '{"temp": 21}' + ENTER + CTRL_D, conv=conv)
    text = term.text()
    assert "tool call: get_weather" in text and '"city": "Paris"' in text and "call_abc" in text
    assert "result of get_weather:" in text and "It is 21 C in Paris." in text
    lines = term.lines()
    at = next(i for i, line in enumerate(lines) if "Thought for" in line)
    assert lines[at + 1] == "Let me check." and "tool call: get_weather" in lines[at + 2]  # no stray blank lines
    assert session.calls[0]["tools"] == WEATHER
    second = session.calls[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert second[-1] == {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": '{"temp": 21}'}


def test_tool_call_skipped_with_enter_and_stopped_with_ctrl_c():
    conv = Conversation(model="fake", tools=WEATHER)
    session = FakeSession(tool_call_turn(), answer("No data, sorry."), tool_call_turn("Rome"))
    repl, _ = drive(session, "a?" + ENTER + ENTER + "b?" + ENTER + "\x03" + CTRL_D, conv=conv)
    tool_msgs = [m for m in repl.conv.messages if m["role"] == "tool"]
    assert len(tool_msgs) == 2 and all("skipped" in m["content"] for m in tool_msgs)
    assert len(session.calls) == 3  # Enter skipped and continued; Ctrl-C stopped without a 4th turn


def test_a_cut_off_tool_call_is_reported_not_run():
    script = [ToolCallStart(0, "call_x", "get_weather"), ToolCallArgsDelta(0, '{"city": "Par'), Finish("length")]
    repl, term = drive(FakeSession(script), "w?" + ENTER + CTRL_D, conv=Conversation(tools=WEATHER))
    assert "tool call get_weather was cut off and is dropped" in term.text() and "result of" not in term.text()
    assert "tool_calls" not in repl.conv.messages[-1]


def test_tools_file_errors_are_typed(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('[{"type": "function", "function": {}}]')
    with pytest.raises(InputError, match="tool 0 needs"):
        load_tools(f)
    f.write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_tools(f)


# -- input ----------------------------------------------------------------------------------------------
def test_multiline_with_esc_enter_and_bracketed_paste():
    session = FakeSession(answer("one"), answer("two"))
    paste = "\x1b[200~pasted line 1\npasted line 2\x1b[201~"
    repl, _ = drive(session, "first" + ESC_ENTER + "second" + ENTER + paste + ENTER + CTRL_D)
    users = [m["content"] for m in repl.conv.messages if m["role"] == "user"]
    assert users == ["first\nsecond", "pasted line 1\npasted line 2"]


def test_history_survives_a_restart(tmp_path):
    hist = tmp_path / "chat_history"
    drive(FakeSession(answer("a")), "what is 6*7?" + ENTER + CTRL_D, history=hist)
    assert "what is 6*7?" in hist.read_text()
    session = FakeSession(answer("b"))
    repl, _ = drive(session, UP + ENTER + CTRL_D, history=hist)  # arrow-up recalls the last run's line
    assert repl.conv.messages[0]["content"] == "what is 6*7?"


# -- piped mode -----------------------------------------------------------------------------------------
def test_split_prompts():
    assert split_prompts("  a question\nover two lines\n", each_line=False) == ["a question\nover two lines"]
    assert split_prompts("q1\n\n q2 \n", each_line=True) == ["q1", "q2"]
    assert split_prompts("\n \n", each_line=False) == []


def test_piped_output_is_plain_text_without_thinking_by_default():
    out, err = io.StringIO(), io.StringIO()
    session = FakeSession(answer("**Hi** there.", thinking="secret plan"), answer("Bye."))
    code = PipedChat(session, Conversation(), out=out, err=err).run(["hello", "bye"])
    assert code == 0 and out.getvalue() == "**Hi** there.\n\nBye.\n" and err.getvalue() == ""
    assert session.calls[1]["messages"][1]["content"] == "**Hi** there."  # one conversation


def test_piped_show_thinking_and_errors():
    out, err = io.StringIO(), io.StringIO()
    code = PipedChat(FakeSession(answer("Yes.", thinking="let me see")), Conversation(), out=out, err=err,
                     show_thinking=True).run(["q"])  # fmt: skip
    assert code == 0 and out.getvalue() == "<think>\nlet me see\n</think>\n\nYes.\n"
    out, err = io.StringIO(), io.StringIO()
    code = PipedChat(FakeSession(answer("x"), max_messages=0), Conversation(), out=out, err=err).run(["q"])
    assert code == 1 and err.getvalue().startswith("error: prompt of 100 tokens") and out.getvalue() == ""
    assert PipedChat(FakeSession(), Conversation(), out=out, err=err).run([]) == 2


def test_piped_tool_call_needs_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    conv = Conversation(tools=WEATHER)
    code = PipedChat(FakeSession(tool_call_turn()), conv, out=out, err=err).run(["weather?"])
    assert code == 3 and out.getvalue() == "Let me check.\n"
    assert err.getvalue() == 'tool call get_weather({"city": "Paris"}) needs a terminal to answer; stopping\n'
