"""Prompt processing speed by n_ubatch on this machine, next to the planner's choice and its estimate.

Loads the GGUF once per ubatch with the planner's placement (n_batch = the largest ubatch, so every run
evaluates the same logical batches), evaluates a cold prompt (no KV reuse) and reports prompt tokens/s,
best of --reps. On a CPU the prompt is compute-bound: the ubatch size should matter little past a few
hundred tokens (the planner keeps 512 there); on a GPU with experts in RAM a larger ubatch amortises the
upload of CPU-resident expert weights, which is what the planner's ubatch choice is for.

    python bench/ubatch.py [--model PATH.gguf] [--prompt 2048] [--ubatch 64,128,256,512,1024,2048] [--reps 2]

Without --model it uses the test fixture "bench1g" Q4_K_M GGUF (built on first use).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import agent_prefix, default_model


def prompt_speed(path: Path, placement, ubatch: int, n_batch: int, n_prompt: int, reps: int) -> float:
    from glmlocal.engine.engine import CacheConfig, Engine
    from glmlocal.engine.generation import Sampling

    with Engine.load(path, replace(placement, n_batch=n_batch, n_ubatch=ubatch),
                     cache=CacheConfig(max_entries=0)) as eng:
        text = agent_prefix(n_prompt)  # more words than tokens: cut below
        prompt = eng.tokenize("[gMASK]<sop><|user|>\n" + text)[:n_prompt]
        best = 0.0
        for _ in range(reps + 1):  # the first run also pays for the context's first allocations
            eng.reset()
            out = list(eng.generate(prompt, Sampling(temperature=0), max_tokens=1))
            st = out[-1].stats
            best = max(best, (st.prompt_tokens - st.cached_tokens) / st.prompt_s)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF (default: the bench1g test fixture)")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--ubatch", default="64,128,256,512,1024,2048", help="comma-separated n_ubatch values")
    ap.add_argument("--threads", type=int, help="CPU threads (default: the planner's)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from glmlocal.plan.hardware import probe
    from glmlocal.plan.options import PlanOptions
    from glmlocal.plan.planner import footprint_from_gguf
    from glmlocal.plan.planner import plan as plan_for

    path = args.model or default_model()
    ubatches = [int(u) for u in args.ubatch.split(",")]
    # the planner's estimate for a prompt of the same length as the one measured (its display uses 20K tokens)
    plan = plan_for(footprint_from_gguf(path), probe(PlanOptions(threads=args.threads)),
                    ctx=max(4096, args.prompt + 256), prompt_ref=args.prompt)
    print(f"model: {path} ({path.stat().st_size / 2**20:.0f} MiB), {args.prompt}-token prompt, "
          f"{plan.n_threads} threads; the planner chose ubatch {plan.n_ubatch}"
          + (f", estimating {plan.est_prompt_tokens_per_s:.0f} tok/s" if plan.est_prompt_tokens_per_s else ""))
    speeds = {}
    for u in ubatches:
        speeds[u] = prompt_speed(path, plan, u, max(ubatches), args.prompt, args.reps)
        print(f"  ubatch {u:5d}: {speeds[u]:8.1f} prompt tok/s")
    best = max(speeds, key=speeds.__getitem__)
    chosen = speeds.get(plan.n_ubatch) or prompt_speed(path, plan, plan.n_ubatch, max(ubatches), args.prompt,
                                                       args.reps)
    print(f"fastest ubatch {best} ({speeds[best]:.1f} tok/s); the planner's {plan.n_ubatch} gives {chosen:.1f} "
          f"tok/s, ratio {chosen / speeds[best]:.3f} of the fastest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
