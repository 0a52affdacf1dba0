"""Benchmark `glmlocal serve` against the engine called in-process.

1. Streamed decode speed: tokens/s of a greedy completion read through the server's SSE stream vs the same
   request run by Session in this process (target ratio >= 0.97).
2. Prompt-cache reuse: time to first token of turn 10 of an agent loop sharing an ~8K-token prefix, vs the
   same turn-10 prompt sent to a freshly started server (cold) (target ratio <= 0.15).
3. A side request while a long answer streams (serve --parallel 2): the short request's time to first token
   over the long answer's duration (target <= 0.2), and the same with --parallel 1 (one at a time: it waits).
4. Four requests at once vs the same four one after another on a --parallel 4 server: wall-time ratio
   (target <= 0.9 on a 2-core CPU with the ~1 GB Q4_K_M fixture).

Benchmarks 3 and 4 run with --spec off, so they measure batching alone.

    python bench/serve.py [--model PATH.gguf] [--tokens 128] [--prefix 8000] [--reps 3] [--only NAME]

Without --model it uses the test fixture "bench1g" Q4_K_M GGUF (built on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_live import ServeProcess

NO_THINK = {"enable_thinking": False, "clear_thinking": False}
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma", "omega", "river", "mountain", "forest", "ocean", "compile", "module", "function", "variable", "pointer", "memory", "buffer", "socket", "thread", "kernel"]


def default_model() -> Path:
    from tests.conftest import build_cached_gguf

    return build_cached_gguf("bench1g", "q4_k_m")


def stream_chat(url: str, body: dict, started: threading.Event | None = None) -> dict:
    """One streamed chat completion; returns ttft (first generated text), decode time and token count.
    `started` is set when the first text arrives."""
    t0 = time.perf_counter()
    first = last = None
    usage = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                last = time.perf_counter()
                first = first or last
                if started is not None:
                    started.set()
    return {"ttft": (first or time.perf_counter()) - t0, "decode_s": (last or 0) - (first or 0),
            "total_s": time.perf_counter() - t0,
            "tokens": usage.get("completion_tokens", 0), "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
            "prompt": usage.get("prompt_tokens", 0)}


def engine_decode(model, messages: list, tokens: int) -> dict:
    """The same request through Session in this process, timed the same way (first to last text event)."""
    from glmlocal.engine.generation import Sampling
    from glmlocal.engine.session import TurnResult

    first = last = None
    result = None
    for item in model.session.turn(messages, enable_thinking=False, clear_thinking=False,
                                   sampling=Sampling(temperature=0, seed=1), max_tokens=tokens,
                                   cancel=threading.Event()):
        if isinstance(item, TurnResult):
            result = item
        elif getattr(item, "text", None):
            last = time.perf_counter()
            first = first or last
    return {"decode_s": (last or 0) - (first or 0), "tokens": result.completion_tokens}


def tps(run: dict) -> float:
    # The first generated token's time belongs to the prompt; decode speed counts the rest.
    return (run["tokens"] - 1) / run["decode_s"] if run["decode_s"] > 0 else 0.0


def bench_decode(path: Path, ctx: int, tokens: int, reps: int) -> tuple[float, float]:
    """Best-of-`reps` decode tok/s in-process and through the server, runs interleaved so that load from
    other processes on a shared machine hits both sides alike."""
    from rich.console import Console

    from glmlocal.launch import open_model
    from glmlocal.plan.options import PlanOptions

    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    body = {"model": "bench", "messages": messages, "max_tokens": tokens, "temperature": 0, "seed": 1,
            "chat_template_kwargs": NO_THINK}
    engine_runs, server_runs = [], []
    srv = ServeProcess(path, "--ctx", str(ctx), "--alias", "bench", "--spec", "off")  # as the in-process engine
    model = open_model(str(path), PlanOptions(ctx=ctx), Console(quiet=True))
    try:
        stream_chat(srv.url, body), engine_decode(model, messages, tokens)  # warm-up both
        for _ in range(reps):
            run = stream_chat(srv.url, body)
            server_runs.append(tps(run))
            mine = engine_decode(model, messages, tokens)
            engine_runs.append(tps(mine))
            print(f"  server {run['tokens']} tokens in {run['decode_s']:.3f} s | "
                  f"engine {mine['tokens']} tokens in {mine['decode_s']:.3f} s")
    finally:
        model.close()
        srv.stop()
    return max(engine_runs), max(server_runs)


def agent_prefix(n_words: int) -> str:
    """Deterministic project-notes text of `n_words` words."""
    words = [WORDS[(i * 7 + i // 13) % len(WORDS)] for i in range(n_words)]
    lines = [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]
    return "You are a coding agent. Project notes follow.\n" + "\n".join(lines)


def count_tokens(url: str, system: str) -> int:
    body = {"model": "bench", "system": system, "messages": [{"role": "user", "content": "x"}]}
    return httpx.post(url + "/v1/messages/count_tokens", json=body, timeout=60).json()["input_tokens"]


def agent_loop(url: str, system: str, turns: int) -> tuple[list[dict], dict]:
    """Run `turns` agent turns; return (the last turn's messages, its timing)."""
    messages = [{"role": "system", "content": system}]
    timing = {}
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": f"Step {turn}: read file src/module_{turn}.py and summarise it."})
        body = {"model": "bench", "messages": messages, "max_tokens": 16, "temperature": 0, "seed": turn,
                "chat_template_kwargs": NO_THINK}
        if turn == turns:
            return messages, stream_chat(url, body)
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
        if "choices" not in reply:
            raise SystemExit(f"turn {turn} failed: {reply}")
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"] or "ok"})
    return messages, timing


def bench_ttft(path: Path, ctx: int, prefix_tokens: int, turns: int) -> tuple[dict, dict]:
    srv = ServeProcess(path, "--ctx", str(ctx), "--alias", "bench")
    try:
        per_word = count_tokens(srv.url, agent_prefix(1000)) / 1000  # tokenizers differ: calibrate
        system = agent_prefix(int(prefix_tokens / per_word))
        print(f"shared prefix: {count_tokens(srv.url, system)} tokens")
        messages, warm = agent_loop(srv.url, system, turns)
    finally:
        srv.stop()
    cold_srv = ServeProcess(path, "--ctx", str(ctx), "--alias", "bench")
    try:
        body = {"model": "bench", "messages": messages, "max_tokens": 16, "temperature": 0, "seed": turns,
                "chat_template_kwargs": NO_THINK}
        cold = stream_chat(cold_srv.url, body)
    finally:
        cold_srv.stop()
    return warm, cold


def no_eog_bias(path: Path) -> dict[str, int]:
    """logit_bias banning every end-of-generation token (read from the GGUF's vocabulary only), so a random
    fixture model writes exactly max_tokens."""
    import llama_cpp.llama_cpp as C

    mp = C.llama_model_default_params()
    mp.vocab_only = True
    model = C.llama_model_load_from_file(str(path).encode(), mp)
    try:
        vocab = C.llama_model_get_vocab(model)
        return {str(t): -100 for t in range(C.llama_vocab_n_tokens(vocab)) if C.llama_vocab_is_eog(vocab, t)}
    finally:
        C.llama_model_free(model)


def side_request(path: Path, ctx: int, tokens: int, parallel: int, bias: dict) -> tuple[dict, dict]:
    """A long greedy answer streams; once its first token is out, a short request is sent. Returns (long, short)
    timings: the long one's total_s is its duration (to the end of its stream: a random model's text may stop
    early, e.g. inside tool-call markup), the short one's ttft is how long it waited."""
    srv = ServeProcess(path, "--ctx", str(ctx), "--alias", "bench", "--parallel", str(parallel), "--spec", "off")
    try:
        def body(text: str, n: int) -> dict:
            return {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": n,
                    "temperature": 0, "seed": 1, "logit_bias": bias, "chat_template_kwargs": NO_THINK}

        stream_chat(srv.url, body("warm up", 4))
        started, result = threading.Event(), {}
        long = threading.Thread(target=lambda: result.update(long=stream_chat(
            srv.url, body("Write a long story about a lighthouse keeper.", tokens), started)))
        long.start()
        started.wait(600)
        short = stream_chat(srv.url, body("A title for it, please.", 8))
        long.join()
    finally:
        srv.stop()
    return result["long"], short


def bench_side(path: Path, ctx: int, tokens: int, bias: dict) -> None:
    for parallel in (2, 1):
        long, short = side_request(path, ctx, tokens, parallel, bias)
        duration = long["total_s"]
        print(f"side request, --parallel {parallel}: first token after {short['ttft'] * 1000:.0f} ms while a "
              f"{long['tokens']}-token answer took {duration:.2f} s: ratio {short['ttft'] / duration:.3f}"
              + (" (target <= 0.2)" if parallel > 1 else " (one at a time: it waits for the long answer)"))


def bench_concurrent(path: Path, ctx: int, tokens: int, reps: int, bias: dict) -> None:
    """Best-of-`reps` wall time of 4 requests one after another and all at once, interleaved, each round with
    prompts of its own (no prefix reuse between rounds)."""
    srv = ServeProcess(path, "--ctx", str(ctx), "--alias", "bench", "--parallel", "4", "--spec", "off")

    def body(r: int, i: int) -> dict:
        text = f"Round {r}, request {i}: write about {WORDS[(r * 4 + i) % len(WORDS)]} and {WORDS[i]}."
        return {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
                "temperature": 0, "seed": 1, "logit_bias": bias, "chat_template_kwargs": NO_THINK}

    def post(b: dict) -> None:
        r = httpx.post(srv.url + "/v1/chat/completions", json=b, timeout=600)
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == tokens

    seq, conc = [], []
    try:
        post(body(-1, 0))
        for r in range(reps):
            t0 = time.perf_counter()
            for i in range(4):
                post(body(2 * r, i))
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=post, args=(body(2 * r + 1, i),)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            conc.append(time.perf_counter() - t0)
            print(f"  round {r}: one after another {seq[-1]:.2f} s, at once {conc[-1]:.2f} s")
    finally:
        srv.stop()
    print(f"4 x {tokens} tokens: one after another {min(seq):.2f} s, at once {min(conc):.2f} s, "
          f"ratio {min(conc) / min(seq):.3f} (best of {reps}; target <= 0.9)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF to serve (default: the bench1g test fixture)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens to decode per speed run")
    ap.add_argument("--prefix", type=int, default=8000, help="approximate shared prefix in tokens")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--long", type=int, default=1024, help="tokens of the long answer (side request)")
    ap.add_argument("--only", choices=["decode", "ttft", "side", "concurrent"], help="run one measurement")
    args = ap.parse_args()
    path = args.model or default_model()
    ctx = max(4096, args.prefix + 2048)
    print(f"model: {path} ({path.stat().st_size / 2**20:.0f} MiB), ctx {ctx}")
    if args.only in (None, "decode"):
        engine_tps, server_tps = bench_decode(path, ctx, args.tokens, args.reps)
        print(f"decode: engine in-process {engine_tps:.1f} tok/s, through server (SSE) {server_tps:.1f} tok/s, "
              f"ratio {server_tps / engine_tps:.3f} (best of {args.reps}; target >= 0.97)")
    if args.only in (None, "ttft"):
        warm, cold = bench_ttft(path, ctx, args.prefix, args.turns)
        print(f"TTFT turn {args.turns}: {warm['ttft'] * 1000:.0f} ms with cache ({warm['cached']}/{warm['prompt']} "
              f"prompt tokens reused) vs {cold['ttft'] * 1000:.0f} ms cold ({cold['cached']} reused), "
              f"ratio {warm['ttft'] / cold['ttft']:.3f} (target <= 0.15)")
    if args.only in (None, "side"):
        bench_side(path, max(4096, args.long + 1024), args.long, no_eog_bias(path))
    if args.only in (None, "concurrent"):
        bench_concurrent(path, max(4096, 4 * args.tokens + 1024), args.tokens, args.reps, no_eog_bias(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
