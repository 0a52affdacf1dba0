"""`glmlocal chat` end to end: the real REPL on real llama.cpp with fixture GGUFs (random tiny GLM models).

In-process tests feed keys through prompt_toolkit's pipe input and read the screen through a pyte terminal
(see tests/test_chat.py's Terminal); subprocess tests run `python -m glmlocal chat` piped and on a real
pseudo-terminal (pexpect), pressing Ctrl-C on the tty like a person would.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pyte
import pytest
from rich.console import Console

from glmlocal.chat.transcript import Conversation
from glmlocal.engine.generation import Sampling
from glmlocal.engine.session import Session
from glmlocal.launch import LoadedModel, open_model
from glmlocal.plan.options import PlanOptions
from tests.cli_run import default_sigint, run_piped
from tests.test_chat import CTRL_D, ENTER, Terminal, drive

REPO = Path(__file__).resolve().parent.parent
CTX = 2048
STATUS = re.compile(r"(\d+\.\d) tok/s · first token (\d+\.\d\d) s · context (\d+) / (\d+) · cached (\d+) · (\d+) tokens")
# An enum keeps the forced arguments short; a free string from a random model runs to max_tokens.
CITY_TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}}]
GREEDY = {"sampling": Sampling(temperature=0.0, seed=0)}


@pytest.fixture(scope="module")
def glm45(gguf_factory):
    """The GLM-4.5/4.6-layout fixture loaded through the chat's own start-up path; the screen it printed."""
    term = Terminal(width=100, height=40)
    model = open_model(str(gguf_factory("tiny", "q4_k_m")), PlanOptions(ctx=CTX), term.console)
    yield model, term
    model.close()


@pytest.fixture(scope="module")
def glm47(gguf_factory):
    model = open_model(str(gguf_factory("tiny", "q4_k_m", family="glm47")), PlanOptions(ctx=CTX),
                            Console(file=io.StringIO()))  # fmt: skip
    yield model
    model.close()


def budgeted(model: LoadedModel, tokens: int = 12) -> Session:
    """A session whose thinking budget closes the think block after `tokens`: a random model then really moves
    from reasoning to an answer (response_format json_object) or to a tool call (tool_choice required)."""
    return Session(model.engine, model.session.template, model.family, think_budget=tokens)


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z]{4,}", text)]


def test_load_shows_placement(glm45):
    model, term = glm45
    text = term.text()
    assert "loading model.gguf" in text and "GPU layers" in text and "context" in text and str(CTX) in text
    assert model.n_ctx == CTX and model.family == "glm45"
    assert "━" in term.buf.getvalue() and "100%" in term.buf.getvalue()  # the progress bar ran (it is transient)
    assert "━" not in text


def test_streamed_answer_and_status_line_match_the_engine(glm45):
    model, _ = glm45
    keys = "/bogus" + ENTER + "Hello there" + ENTER + CTRL_D
    repl, term = drive(model.session, keys, conv=Conversation(enable_thinking=False), n_ctx=model.n_ctx,
                       max_tokens=48, turn_kwargs=GREEDY)  # fmt: skip
    answer = repl.conv.messages[-1]
    assert answer["role"] == "assistant" and repl.last_usage is not None
    assert "unknown command /bogus" in term.text() and "/save FILE" in term.text()  # help, not a crash
    usage = repl.last_usage
    m = STATUS.search(term.text())
    assert m, term.text()
    assert int(m[3]) == usage.prompt_tokens + usage.completion_tokens and int(m[4]) == CTX
    assert int(m[6]) == usage.completion_tokens and 0 < usage.completion_tokens <= 48
    assert float(m[1]) == pytest.approx(usage.tokens_per_s, abs=0.051)
    shown = term.flat()
    missing = [w for w in words(answer["content"]) if w not in shown]
    assert len(missing) <= len(words(answer["content"])) // 5  # Markdown may restyle a few bits, not drop text


def test_thinking_collapses_when_the_real_answer_starts(glm45):
    model, _ = glm45
    session = budgeted(model)
    opens = Sampling(temperature=0.0, seed=0, logit_bias={model.engine.token_id("<think>"): 30.0})
    kwargs = {"sampling": opens, "response_format": {"type": "json_object"}}  # GLM-4.5 opens the block itself
    repl, term = drive(session, "Think, then answer" + ENTER + "/show-thinking" + ENTER + CTRL_D, n_ctx=model.n_ctx,
                       max_tokens=64, turn_kwargs=kwargs)  # fmt: skip
    msg = repl.conv.messages[1]
    assert msg.get("reasoning_content") and msg["content"].startswith("{")
    lines = term.lines()
    at = next(i for i, line in enumerate(lines) if "› /show-thinking" in line)
    before, after = "\n".join(lines[:at]), " ".join(" ".join(lines[at:]).split())
    n = repl.last_usage.reasoning_tokens  # counted by the session as the engine generated them
    assert 0 < n < repl.last_usage.completion_tokens
    assert re.search(rf"▸ Thought for {n} tokens / \d+\.\d s", before)
    first_words = words(msg["reasoning_content"])[:3]
    assert all(w in after for w in first_words)  # /show-thinking expands what was collapsed


def test_glm47_thinking_is_summarised_even_if_it_never_ends(glm47):
    assert glm47.family == "glm47"  # detected from the GGUF's own template
    repl, term = drive(glm47.session, "hi" + ENTER + CTRL_D, n_ctx=glm47.n_ctx,
                       max_tokens=24, turn_kwargs=GREEDY)  # fmt: skip
    msg = repl.conv.messages[1]
    assert msg.get("reasoning_content")
    usage = repl.last_usage  # every generated token was thinking: the count is the whole reply
    assert usage.reasoning_tokens == usage.completion_tokens == 24
    assert "▸ Thought for 24 tokens" in term.text() and "stopped at the token limit" in term.text()


def test_think_n_ends_the_thinking_of_a_model_that_never_stops_and_it_answers(glm47):
    """The random GLM-4.7 fixture never closes `</think>` (the test above): `/think 64` makes the engine close
    it after 64 tokens, and the rest of the reply is an answer."""
    no_end = Sampling(seed=5, logit_bias={t: float("-inf") for t in glm47.engine.eog_ids})
    repl, term = drive(glm47.session, "/think 64" + ENTER + "hi" + ENTER + CTRL_D, n_ctx=glm47.n_ctx,
                       max_tokens=90, turn_kwargs={"sampling": no_end})  # fmt: skip
    usage, msg = repl.last_usage, repl.conv.messages[1]
    assert usage.reasoning_tokens == 64 and usage.completion_tokens == 90
    assert msg.get("reasoning_content") and msg["content"]
    assert "▸ Thought for 64 tokens" in term.text() and "think on ≤64" in repl.prompt_status()


def test_ctrl_c_interrupts_a_real_generation_and_the_repl_continues(glm45):
    model, _ = glm45
    term = Terminal()

    def press_ctrl_c_once_streaming():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "answering" in term.buf.getvalue():  # only while a turn runs: then SIGINT is the REPL's
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    no_end = Sampling(seed=1, logit_bias={t: float("-inf") for t in model.engine.eog_ids})  # runs until stopped
    presser = threading.Thread(target=press_ctrl_c_once_streaming, daemon=True)
    presser.start()
    repl, term = drive(model.session, "Tell me everything" + ENTER + "/stats" + ENTER + CTRL_D, term=term,
                       conv=Conversation(enable_thinking=False), n_ctx=model.n_ctx,
                       turn_kwargs={"sampling": no_end})  # fmt: skip
    presser.join(5)
    usage = repl.last_usage
    assert "stopped (Ctrl-C)" in term.text() and "› /stats" in term.text()
    assert usage.completion_tokens < CTX - usage.prompt_tokens  # it did not run to the end of the context
    assert repl.conv.messages[-1]["role"] == "assistant"


def test_tool_call_round_trip_with_the_real_engine(glm45):
    model, _ = glm45
    conv = Conversation(tools=CITY_TOOL, enable_thinking=False)
    kwargs = {**GREEDY, "tool_choice": "required"}
    keys = "Weather in Paris?" + ENTER + '{"temp": 21}' + ENTER + "\x03" + CTRL_D
    repl, term = drive(budgeted(model), keys, conv=conv, n_ctx=model.n_ctx, max_tokens=80, turn_kwargs=kwargs)
    text = term.text()
    assert "tool call: get_weather" in text and re.search(r'"city": "(Paris|Rome)"', text)
    assert "result of get_weather:" in text
    roles = [m["role"] for m in repl.conv.messages]
    assert roles[:4] == ["user", "assistant", "tool", "assistant"]
    call = repl.conv.messages[1]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    assert repl.conv.messages[2] == {"role": "tool", "tool_call_id": call["id"], "name": "get_weather",
                                     "content": '{"temp": 21}'}  # fmt: skip


def test_context_overflow_is_reported_and_nothing_is_lost(glm45):
    model, _ = glm45
    huge = "lorem ipsum " * 1500
    paste = "\x1b[200~" + huge + "\x1b[201~"  # pasted in one go, as a person would
    repl, term = drive(model.session, paste + ENTER + "/stats" + ENTER + CTRL_D, n_ctx=model.n_ctx)
    assert "context full" in term.text() and "/drop N" in term.text()
    assert repl.pending == huge and repl.conv.messages == []


def test_save_and_load_round_trip_with_the_real_engine(glm45, tmp_path):
    model, _ = glm45
    path = tmp_path / "t.json"
    conv = Conversation(model="tiny", system="Be brief.", tools=CITY_TOOL, enable_thinking=False)
    first, _ = drive(model.session, "One" + ENTER + f"/save {path}" + ENTER + CTRL_D, conv=conv, n_ctx=model.n_ctx,
                     max_tokens=8, turn_kwargs=GREEDY)  # fmt: skip
    body = json.loads(path.read_text())
    repl, term = drive(model.session, f"/load {path}" + ENTER + "Two" + ENTER + CTRL_D, n_ctx=model.n_ctx,
                       max_tokens=8, turn_kwargs=GREEDY)  # fmt: skip
    assert repl.conv.system == "Be brief." and repl.conv.tools == CITY_TOOL and not repl.conv.enable_thinking
    assert repl.conv.messages[:2] == first.conv.messages == body["messages"][1:]
    assert [m["role"] for m in repl.conv.messages] == ["user", "assistant", "user", "assistant"]


def test_a_saved_chat_is_a_request_body_the_server_accepts(glm45, tmp_path):
    from glmlocal.server.openai import ChatCompletionRequest, to_turn

    model, _ = glm45
    path = tmp_path / "t.json"
    conv = Conversation(model="tiny", system="Be brief.", tools=CITY_TOOL, enable_thinking=False)
    repl, _ = drive(model.session, "One" + ENTER + f"/save {path}" + ENTER + CTRL_D, conv=conv, n_ctx=model.n_ctx,
                    max_tokens=8, turn_kwargs=GREEDY)  # fmt: skip
    turn = to_turn(ChatCompletionRequest.model_validate(json.loads(path.read_text())))
    assert turn.enable_thinking is False and turn.tools == CITY_TOOL
    # the server would render exactly the prompt the chat rendered
    chat_prompt = model.session.prepare(repl.conv.request_messages(), CITY_TOOL, enable_thinking=False).prompt
    assert model.session.prepare(turn.messages, turn.tools, enable_thinking=turn.enable_thinking).prompt == chat_prompt


# -- the installed command ------------------------------------------------------------------------------
def run_cli(args: list[str], stdin: str, tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_piped(["chat", *args], tmp_path / "home", stdin=stdin, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_piped_chat_prints_plain_answers(gguf_factory, tmp_path):
    gguf = str(gguf_factory("tiny", "q4_k_m"))
    r = run_cli([gguf, "--ctx", "1024", "--max-tokens", "12", "--temperature", "0", "--no-think", "--each-line"],
                "first question\nsecond question\n", tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "<think>" not in r.stdout and "\x1b[" not in r.stdout
    # no plan table, progress bar or llama.cpp log in a script's output; only the truncation warnings
    assert set(r.stderr.splitlines()) <= {"warning: the answer was cut off at the token limit"}
    assert r.stdout.count("\n\n") >= 1  # two answers, one blank line apart
    again = run_cli([gguf, "--ctx", "1024", "--max-tokens", "12", "--temperature", "0", "--no-think"],
                    "first question\n", tmp_path)  # fmt: skip
    assert again.returncode == 0 and again.stdout.split("\n\n")[0].strip() == r.stdout.split("\n\n")[0].strip()


@pytest.mark.slow
def test_piped_chat_show_thinking_and_errors(gguf_factory, tmp_path):
    gguf47 = str(gguf_factory("tiny", "q4_k_m", family="glm47"))
    r = run_cli([gguf47, "--ctx", "1024", "--max-tokens", "10", "--show-thinking"], "hi", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<think>\n")
    bad = run_cli([str(tmp_path / "nope.gguf")], "hi", tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    (tmp_path / "tools.json").write_text('{"tools": [{"type": "function"}]}')
    badtools = run_cli([gguf47, "--tools", str(tmp_path / "tools.json")], "hi", tmp_path)
    assert badtools.returncode == 2 and "tool 0 needs" in badtools.stderr
    nothing = run_cli([gguf47, "--resume"], "hi", tmp_path)
    assert nothing.returncode == 2 and "no saved chat to resume" in nothing.stderr
    empty = run_cli([gguf47], "", tmp_path)
    assert empty.returncode == 2 and "no prompt" in empty.stderr
    long = run_cli([gguf47, "--ctx", "256"], "word " * 400, tmp_path)
    assert long.returncode != 0 and "exceeds the context of 256 tokens" in long.stderr


@pytest.mark.slow
def test_chat_on_a_real_terminal(gguf_factory, tmp_path):
    """A person at a terminal: type, watch it stream, Ctrl-C mid-answer, ask again, /exit."""
    # The 217 MB "mid" fixture decodes ~10x slower than "tiny", so an answer is still streaming when Ctrl-C
    # arrives even on a busy machine (tiny's random answers could end on their own before the key did).
    gguf = str(gguf_factory("mid", "q4_k_m"))
    env = {**os.environ, "GLMLOCAL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "TERM": "xterm-256color",
           "PROMPT_TOOLKIT_NO_CPR": "1"}  # pyte does not answer cursor-position requests
    rows = 200  # tall enough that nothing scrolls away: each attempt is judged by the lines below its prompt
    # default_sigint: Ctrl-C must reach the chat even when pytest itself runs in the background
    child = pexpect.spawn(sys.executable, ["-m", "glmlocal", "chat", gguf, "--ctx", "2048", "--no-think"],
                          env=env, cwd=str(tmp_path), dimensions=(rows, 100), encoding="utf-8", timeout=120,
                          preexec_fn=default_sigint)  # fmt: skip
    screen = pyte.Screen(100, rows)
    stream = pyte.Stream(screen)

    def wait_until(found, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                stream.feed(child.read_nonblocking(65536, timeout=0.2))
            except pexpect.TIMEOUT:
                pass
            if found():
                return
        raise AssertionError(f"{what} never appeared:\n" + "\n".join(screen.display))

    def below(marker: str) -> str:
        """The screen from the last line containing `marker` down."""
        lines = screen.display
        at = max((i for i, line in enumerate(lines) if marker in line), default=None)
        return "" if at is None else "\n".join(lines[at:])

    def wait_below(marker: str, pattern: str) -> None:
        wait_until(lambda: re.search(pattern, below(marker)), f"{pattern!r} below {marker!r}")

    outcomes = {"stopped": r"stopped \(Ctrl-C\)", "ended": r"tok/s · first token", "empty": r"nothing was generated"}
    try:
        wait_until(lambda: re.search(r"^› ", "\n".join(screen.display), re.M), "the prompt")
        for attempt in range(4):  # a random model may end its answer before the key arrives, or Ctrl-C may
            sent = f"Tell me a long story, take {attempt}"  # land before the first token: then ask again
            child.send(sent + "\r")  # distinct texts: prompt_toolkit's history skips a repeat
            wait_below(sent, r"answering|thinking")
            child.sendcontrol("c")
            wait_below(sent, "|".join(outcomes.values()))
            if re.search(outcomes["stopped"], below(sent)):
                wait_below(sent, outcomes["ended"])  # a stopped answer still gets its status line
                break
        else:
            raise AssertionError("Ctrl-C never interrupted an answer")
        child.send("/stats\r")
        wait_below("/stats", r"generated this run")
        assert "interrupted" not in "\n".join(screen.display)  # Ctrl-C never escaped a turn
        child.send("/exit\r")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "home" / "chat_history").read_text()
    assert all(f"+Tell me a long story, take {i}\n" in history for i in range(attempt + 1))
    # the chat autosaved, with no unanswered message left in it; a script can continue it
    (saved,) = (tmp_path / "home" / "chats").glob("*.json")
    before = json.loads(saved.read_text())["messages"]
    assert before[0]["role"] == "user" and before[0]["content"].startswith("Tell me a long story, take ")
    assert [m["role"] for m in before] == ["user", "assistant"] * (len(before) // 2) and len(before) % 2 == 0
    assert before[-2]["content"] == sent  # the stopped answer is kept, with its question
    more = run_cli([gguf, "--ctx", "2048", "--max-tokens", "4", "--resume"], "And then?", tmp_path)
    assert more.returncode == 0, more.stderr
    after = json.loads(saved.read_text())["messages"]
    assert after[: len(before)] == before and after[len(before)] == {"role": "user", "content": "And then?"}
