"""Speculative decoding as users meet it: `--spec` / `--draft` on chat and serve (bad values are one line), the
load panel saying what runs and why, the chat status line, and llama-server's `timings` object on
chat-completion responses (non-streamed, and the last streamed chunks) from the real engine."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from rich.console import Console

from glmlocal.engine.generation import Sampling
from glmlocal.engine.session import Session, TurnResult
from glmlocal.engine.spec import SpecConfig, decide
from glmlocal.glm.template import ChatTemplate
from glmlocal.launch import open_model
from glmlocal.plan.options import PlanOptions
from tests.cli_run import run_piped
from tests.test_spec import placement


def test_draft_zero_or_negative_and_unknown_modes_are_usage_errors(tmp_path, gguf_factory):
    path = str(gguf_factory("tiny45", "q4_k_m"))
    for draft in ("0", "-2"):
        r = run_piped(["chat", path, "--draft", draft], tmp_path, stdin="hi")
        assert r.returncode == 2 and "Invalid value for '--draft'" in r.stderr, r.stderr
        r = run_piped(["serve", path, "--draft", draft], tmp_path)
        assert r.returncode == 2 and "Invalid value for '--draft'" in r.stderr, r.stderr
    r = run_piped(["chat", path, "--spec", "fast", "--cpu-only", "--ctx", "1024"], tmp_path, stdin="hi")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unknown --spec 'fast' (use one of auto, mtp, ngram, mtp+ngram, off)"]


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_mtp_on_a_gguf_without_nextn_names_the_ngram_mode(tmp_path, gguf_factory, command):
    path = str(gguf_factory("tiny45", "q4_k_m", mtp=False))
    args = [command, path, "--spec", "mtp", "--cpu-only", "--ctx", "1024"] + (["--port", "0"] if command == "serve" else [])
    r = run_piped(args, tmp_path, stdin="hi" if command == "chat" else None)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "no NextN (MTP) layer" in lines[0] and "use --spec ngram" in lines[0]


def test_piped_chat_runs_with_each_mode(tmp_path, gguf_factory):
    path = str(gguf_factory("tiny", "q4_k_m"))
    outs = []
    for mode in ("off", "ngram", "mtp", "mtp+ngram", "auto"):
        r = run_piped(["chat", path, "--spec", mode, "--draft", "2", "--cpu-only", "--ctx", "1024", "--temperature",
                       "0", "--max-tokens", "24", "--no-think"], tmp_path, stdin="Write a poem.")
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert all(o.strip() for o in outs)


@pytest.mark.parametrize("gguf,mode,expect", [
    (("tiny45", "q4_k_m"), "ngram", "ngram: n-gram up to 16 drafts per step"),
    (("tiny45", "q4_k_m"), "mtp", "mtp: MTP up to 2 drafts per step"),
    (("tiny45", "q4_k_m", False), "auto", "n-gram up to 16 drafts per step, measured: drafts only while they pay; "
                                          "no NextN layer in this GGUF"),
    (("tiny45", "q4_k_m"), "off", "off (--spec off)"),
])
def test_the_load_panel_says_what_runs_and_why(gguf_factory, gguf, mode, expect):
    out = io.StringIO()
    model = open_model(str(gguf_factory(*gguf)), PlanOptions(cpu_only=True, ctx=1024), Console(file=out, width=200),
                       speculation=SpecConfig(mode, 2 if mode == "mtp" else None))
    try:
        assert expect in out.getvalue()
        assert dict(model.info)["speculative"] == model.speculation.describe()
        assert (model.engine.speculator is not None) == (mode != "off")
        assert (model.engine.speculator is not None and model.engine.speculator.mtp is not None) == (mode == "mtp")
    finally:
        model.close()


def test_status_line_shows_drafts_and_acceptance():
    from glmlocal.chat.view import status_line

    usage = TurnResult("stop", 10, 0, 40, 0.5, 20.0, draft_n=41, draft_n_accepted=30)
    assert status_line(usage, 1024).plain.endswith("40 tokens · drafts 30/41 (73%)")
    assert "drafts" not in status_line(TurnResult("stop", 10, 0, 40, 0.5, 20.0), 1024).plain


def test_chat_completions_carry_llama_server_timings(gguf_factory):
    from glmlocal.engine.engine import Engine
    from glmlocal.server.app import ServerConfig, create_app
    from glmlocal.server.backend import SessionBackend
    from tests.server_fakes import ThreadServer

    path = gguf_factory("tiny", "q4_k_m")
    setup = decide(SpecConfig("mtp", 2), has_nextn=True, planned_mtp=True)
    with Engine.load(path, placement(1024), spec=setup) as engine:
        session = Session(engine, ChatTemplate.builtin("glm45"), "glm45", default_sampling=Sampling(temperature=0))
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": False}}
        with ThreadServer(create_app(SessionBackend(session), ServerConfig(model_id="m"))) as srv:
            whole = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
            with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    t = whole["timings"]
    assert set(t) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "draft_n", "draft_n_accepted"}
    assert t["predicted_n"] == whole["usage"]["completion_tokens"] and t["prompt_n"] > 0 and t["predicted_ms"] > 0
    assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]
    assert "timings" not in chunks[0] and chunks[-1]["timings"]["draft_n"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] is not None and "timings" in chunks[-2]
