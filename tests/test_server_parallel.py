"""Several requests at once: the scheduler runs `parallel` jobs and queues the rest (429 only past the queue), and
`glmlocal serve --parallel N` decodes them together, driven by the real openai and anthropic SDKs.

The live server runs the F32 copy of the tiny fixture with --spec off, through the planner's placement (flash
attention on; the CLI has no switch for it). Logits decoded side by side then differ from solo ones by ~2e-3
at most (tests/test_batch.py says why), so a greedy pick can only flip at a near-tie. The prompts compared
are chosen in-process, on the same model and placement, among candidates whose solo greedy answers have no
pick closer than NOISE: for those, answers decoded together must equal the same requests answered one after
another, and the in-process answers, token for token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import numpy as np
import openai
import pytest

from glmlocal.server.app import ServerConfig, create_app
from tests.server_fakes import FakeBackend, ThreadServer
from tests.server_live import ServeProcess
from tests.test_server_live import KEY, _round

GREEDY = {"temperature": 0, "seed": 1}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
NOISE = 1e-2  # a top-2 margin batch-shape drift cannot close: F32 with flash attention drifts ~2e-3
MAX_TOKENS = 24


def user(text):
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------- scheduler
def test_parallel_jobs_run_together_and_429_comes_only_past_the_queue():
    backend = FakeBackend(delay=0.05, tokens=20)  # about 1 s per request
    app = create_app(backend, ServerConfig(model_id="glm", max_queue=2, parallel=3))
    with ThreadServer(app) as srv:
        async def fire():
            async with httpx.AsyncClient(timeout=30) as c:
                body = {"model": "glm", "messages": user("hi")}
                return await asyncio.gather(*[c.post(srv.url + "/v1/chat/completions", json=body) for _ in range(7)])

        seen: list[dict] = []

        def watch():
            while len(seen) < 30:
                seen.append(httpx.get(srv.url + "/health").json())
                time.sleep(0.05)

        t = threading.Thread(target=watch)
        t.start()
        t0 = time.monotonic()
        rs = asyncio.run(fire())
        wall = time.monotonic() - t0
        t.join()
        t0 = time.monotonic()  # the same five, one after another, on the same (maybe loaded) machine
        for _ in range(5):
            assert httpx.post(srv.url + "/v1/chat/completions", json={"model": "glm", "messages": user("hi")},
                              timeout=30).status_code == 200
        one_by_one = time.monotonic() - t0
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 5 and codes.count(429) == 2  # 3 running + 2 queued; the rest turned away
    assert wall < 0.7 * one_by_one, (wall, one_by_one)  # 3 together, then 2 together: about 2/5 of it
    assert max(h["running"] for h in seen) == 3 and {h["parallel"] for h in seen} == {3}


# --------------------------------------------------------------------------------------------- live
@pytest.fixture(scope="module")
def model(f32_gguf_factory):
    return f32_gguf_factory("tiny")


@pytest.fixture(scope="module")
def no_eog(model):
    from glmlocal.engine.engine import Engine
    from glmlocal.plan.planner import Placement

    with Engine.load(model, Placement.cpu_only(ctx=256, threads=1)) as eng:
        return {str(t): -100 for t in eng.eog_ids}


def _question(i: int) -> str:
    return f"Request {i}: describe a lighthouse in {10 + i} words."


@pytest.fixture(scope="module")
def questions(model) -> list[tuple[str, str]]:
    """Eight (question, answer) pairs: the first candidates whose solo greedy answer, decoded in-process as the
    server renders and places it (glm45 template, thinking off, flash attention on), has no near-tie."""
    from glmlocal.engine.engine import Engine
    from glmlocal.engine.generation import Sampling
    from glmlocal.engine.session import Session
    from glmlocal.glm.template import ChatTemplate
    from glmlocal.plan.planner import Placement

    chosen = []
    with Engine.load(model, Placement.cpu_only(ctx=1024, threads=2)) as eng:
        session = Session(eng, ChatTemplate.builtin("glm45"), "glm45")
        for i in range(40):
            prepared = session.prepare(user(_question(i)), enable_thinking=False)
            banned = list(prepared.banned)
            sampling = Sampling(temperature=0, logit_bias={t: float("-inf") for t in banned})
            eng.reset()
            outs = list(eng.generate(prepared.tokens, sampling, max_tokens=MAX_TOKENS, want_logits=True))
            margins = []
            for o in outs:
                logits = o.logits.copy()
                logits[banned] = -np.inf
                top2 = np.sort(logits)[-2:]
                margins.append(top2[1] - top2[0])
            if min(margins) > NOISE:
                chosen.append((_question(i), "".join(o.text for o in outs)))
            if len(chosen) == 8:
                return chosen
    pytest.fail(f"fewer than 8 of 40 candidate questions answer without a near-tie: {len(chosen)}")


@pytest.fixture(scope="module")
def server(model):
    proc = ServeProcess(model, "--ctx", "4096", "--parallel", "4", "--max-queue", "16", "--spec", "off",
                        api_key=KEY)
    yield proc
    proc.stop()


def oa(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def an(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)


def _ask(srv, kind: str, text: str) -> str:
    openai_kw = {"model": "model", "messages": user(text), "max_tokens": MAX_TOKENS, "extra_body": NO_THINK, **GREEDY}
    anthropic_kw = {"model": "model", "messages": user(text), "max_tokens": MAX_TOKENS,
                    "thinking": {"type": "disabled"}, "extra_body": {"temperature": 0}}
    if kind == "openai":
        r = oa(srv).chat.completions.create(**openai_kw)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
        return r.choices[0].message.content or ""
    if kind == "openai-stream":
        chunks = list(oa(srv).chat.completions.create(stream=True, **openai_kw))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if kind == "anthropic":
        m = an(srv).messages.create(**anthropic_kw)
        assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens > 0
        return "".join(b.text for b in m.content if b.type == "text")
    with an(srv).messages.stream(**anthropic_kw) as s:
        m = s.get_final_message()
    assert m.stop_reason in ("end_turn", "max_tokens")
    return "".join(b.text for b in m.content if b.type == "text")


def _said(proc: ServeProcess) -> str:
    return " ".join(proc.output().split())  # the console wraps long lines


def test_the_start_line_says_how_many_run_at_once(server, model):
    assert "4 requests at once in one shared KV pool (--parallel); 16 more may queue, then 429" in _said(server)
    default = ServeProcess(model, "--ctx", "16384")
    try:
        assert "2 requests at once in one shared KV pool (default for this context" in _said(default)
        assert httpx.get(default.url + "/health").json()["parallel"] == 2
    finally:
        default.stop()


def test_concurrent_requests_through_both_sdks_equal_their_sequential_answers(server, questions):
    kinds = ["openai", "openai-stream", "anthropic", "anthropic-stream"] * 2
    texts, answers = zip(*questions)
    one_by_one = [_ask(server, k, text) for k, text in zip(kinds, texts)]
    assert one_by_one == list(answers) and all(answers)
    results: list[str | None] = [None] * len(kinds)

    def run(i):
        results[i] = _ask(server, kinds[i], texts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == one_by_one


def test_concurrent_requests_share_a_cached_system_prompt(server):
    """The first of three concurrent requests continues the earlier turn's idle slot in place; the other two
    copy the shared prefix from it while it runs (llama_memory_seq_cp): all three report it as cached."""
    system = "You are a careful assistant for a lighthouse keeper. " * 12

    def ask(question: str, tokens: int = 8):
        return oa(server).chat.completions.create(model="model", max_tokens=tokens, extra_body=NO_THINK, **GREEDY,
                                                  messages=[{"role": "system", "content": system}] + user(question))

    first = ask("Tell me everything.", 32)
    assert first.usage.prompt_tokens > 300
    with ThreadPoolExecutor(3) as pool:
        side = list(pool.map(ask, ["A title, please.", "Summarise it.", "Any questions?"]))
    for r in side:
        assert r.usage.prompt_tokens_details.cached_tokens > 0.9 * r.usage.prompt_tokens - 12  # all but the question


def test_queue_and_429_beyond_the_running_set(model, no_eog):
    # room for two answers long enough to outlast the checks below even on a quiet machine (the F32 tiny model
    # writes thousands of tokens a second); closing them cancels them
    srv = ServeProcess(model, "--ctx", "65536", "--parallel", "2", "--max-queue", "1", "--spec", "off", api_key=KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": "model", "messages": user("Go on forever."), "max_tokens": 30000, "stream": True,
            "logit_bias": no_eog, **NO_THINK}
    try:
        with httpx.Client(timeout=120, headers=headers) as c:
            with c.stream("POST", srv.url + "/v1/chat/completions", json=long) as a, \
                    c.stream("POST", srv.url + "/v1/chat/completions", json=long) as b:
                lines = a.iter_lines(), b.iter_lines()  # kept: a dropped httpx line iterator closes its response
                next(lines[0]), next(lines[1])
                queued: dict = {}
                t = threading.Thread(target=lambda: queued.update(r=oa(srv).chat.completions.create(
                    model="model", messages=user("short"), max_tokens=4, extra_body=NO_THINK)))
                t.start()
                deadline = time.monotonic() + 30
                while httpx.get(srv.url + "/health").json()["queued"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                with pytest.raises(openai.RateLimitError):
                    oa(srv).chat.completions.create(model="model", messages=user("one more"), max_tokens=4)
                assert not queued
            t.join(60)  # the two long streams closed: the queued request runs
        assert queued["r"].choices[0].finish_reason in ("stop", "length")
    finally:
        srv.stop()


@pytest.mark.slow
def test_load_24_streams_a_quarter_disconnecting_with_parallel_decoding(server):
    results = _round(server.url, 24, seed=11)
    assert set(results) <= {"done", "429", "disconnected"}, results
    assert results.count("done") >= 8 and "disconnected" in results
    time.sleep(1)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0 and not health["busy"]
    assert _ask(server, "openai", _question(99))  # still answering
