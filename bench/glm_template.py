"""Prompt rendering speed: native GLM renderer vs the official template in the Jinja sandbox (same run).

Usage: python bench/glm_template.py [turns]
"""

from __future__ import annotations

import time

from glmlocal.glm import ChatTemplate

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


def conversation(turns: int) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": "You are a coding agent."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question {i}?"},
                 {"role": "assistant", "content": "", "reasoning_content": "Need data.",
                  "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": i}}}]},
                 {"role": "tool", "content": '{"temp": 20}' * 20},
                 {"role": "assistant", "content": "It is 20C. " * 30, "reasoning_content": "Easy."}]
    return msgs


def best_of(fn, repeat: int = 5, number: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return min(times)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("turns", type=int, nargs="?", default=50, help="conversation length (default 50)")
    turns = ap.parse_args().turns
    msgs = conversation(turns)
    for family in ("glm45", "glm47"):
        tpl = ChatTemplate.builtin(family)
        native = best_of(lambda t=tpl: t.render(msgs, [TOOL], renderer="native"))
        jinja = best_of(lambda t=tpl: t.render(msgs, [TOOL], renderer="jinja"))
        print(f"{family}: {turns} turns, native {native * 1e3:.2f} ms, jinja {jinja * 1e3:.2f} ms, "
              f"speedup x{jinja / native:.1f}")


if __name__ == "__main__":
    main()
