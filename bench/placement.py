"""Decode speed and real memory of the planner's placement against two naive ones, same GGUF, same run.

    python bench/placement.py MODEL.gguf [--ctx 4096] [--tokens 64] [--json out.json]

Placements: "planned" (glmlocal's plan for this machine), "experts-on-cpu" (every layer on the GPU with
all routed experts overridden to CPU, llama.cpp's --cpu-moe), and "ngl-only" (as many whole layers on the
GPU as the planned VRAM holds, no tensor overrides: what `-ngl N` users do). For each: prompt and decode
tokens/s, and per-device bytes llama.cpp actually allocated (its load log) next to the planner's
prediction. Prints each naive placement's decode speed as a ratio of the planned one's.
On a CPU-only build all three load the same way, so the ratios are ~1 (a sanity check of the harness).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmlocal import hardware, planner  # noqa: E402
from glmlocal.engine import Engine  # noqa: E402
from glmlocal.generation import Sampling  # noqa: E402

MIB = 1024 * 1024
EXPERTS = r"\.ffn_(up|down|gate)_exps"


def _ngl_only(fp, plan) -> int:
    """Whole layers (trunk, from the end, as -ngl counts) that fit the VRAM the plan used."""
    budget = sum(d.total for d in plan.devices if d.name != "CPU")
    used, n = fp.output, 1  # the output layer counts as one
    for layer in reversed(fp.trunk):
        if used + layer.total > budget:
            break
        used, n = used + layer.total, n + 1
    return n if budget else 0


def placements(path: Path, ctx: int) -> dict:
    fp = planner.footprint_from_gguf(path)
    plan = planner.plan(fp, hardware.probe(None), ctx=ctx)
    return {
        "planned": plan,
        "experts-on-cpu": replace(plan, n_gpu_layers=999, tensor_overrides=[(EXPERTS, "CPU")], tensor_split=None),
        "ngl-only": replace(plan, n_gpu_layers=_ngl_only(fp, plan), tensor_overrides=[]),
    }


def measure(path: Path, placement, n_tokens: int) -> dict:
    with Engine.load(path, placement) as eng:
        prompt = eng.tokenize("[gMASK]<sop><|user|>\n" + "Tell me about mixture of experts. " * 40 + "<|assistant|>")
        no_eog = Sampling(temperature=0, logit_bias={t: float("-inf") for t in eng.eog_ids})
        list(eng.generate(prompt[:32], no_eog, max_tokens=8))  # warm-up: page in weights, start threads
        eng.reset()
        outs = list(eng.generate(prompt, no_eog, max_tokens=n_tokens))
        st = outs[-1].stats
        real = {}
        for kind in ("model", "kv", "compute"):
            for buf, size in eng.report.buffers[kind].items():
                real[buf] = real.get(buf, 0) + size
    predicted = {d.name: d.total for d in getattr(placement, "devices", [])}
    return {"prompt_tok_s": st.prompt_tokens_per_s, "decode_tok_s": st.tokens_per_s, "real_bytes": real,
            "predicted_bytes": predicted, "flags": placement.llama_cpp_flags()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {name: measure(args.gguf, p, args.tokens) for name, p in placements(args.gguf, args.ctx).items()}
    base = results["planned"]["decode_tok_s"] or 1e-9
    for name, r in results.items():
        real = ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in sorted(r["real_bytes"].items()))
        pred = ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in sorted(r["predicted_bytes"].items()))
        print(f"{name:15s} prompt {r['prompt_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.2f} tok/s  "
              f"ratio {r['decode_tok_s'] / base:5.2f}\n{'':15s} real: {real}\n{'':15s} predicted: {pred}\n"
              f"{'':15s} {r['flags']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
