"""Decode speed and real memory of the planner's placement against two naive ones, same GGUF, same run.

    python bench/placement.py MODEL.gguf [--ctx 4096] [--tokens 64] [--json out.json]
    python bench/placement.py MODEL.gguf --rpc 2 --gpu-mem 26MiB,26MiB --margin-mib 0   # no GPU here

Placements: "planned" (glmlocal's plan for this machine), "experts-on-cpu" (every layer on the GPU with
all routed experts overridden to CPU, llama.cpp's --cpu-moe), and "ngl-only" (as many whole layers on the
GPU as the planned VRAM holds, no tensor overrides: what `-ngl N` users do). For each: prompt and decode
tokens/s, and per-device bytes llama.cpp actually allocated (its load log) next to the planner's
prediction. Prints each naive placement's decode speed as a ratio of the planned one's.
On a CPU-only build all three load the same way, so the ratios are ~1 (a sanity check of the harness).
`--rpc N` starts N local ggml RPC servers and uses them as the GPUs (llama.cpp's RPC backend, no GPU
needed): the placements load exactly as they would on N GPUs, but every device computes on this CPU over
loopback, so the speeds measure RPC overhead, not a GPU. Naive placements have no per-device prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmlocal.engine.engine import Engine  # noqa: E402
from glmlocal.engine.generation import Sampling  # noqa: E402
from glmlocal.llama import ggml, rpc  # noqa: E402
from glmlocal.llama import log as llama_log  # noqa: E402
from glmlocal.plan import hardware, planner  # noqa: E402
from glmlocal.plan.options import PlanOptions  # noqa: E402

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


def placements(path: Path, ctx: int, hw, margin: int) -> dict:
    fp = planner.footprint_from_gguf(path)
    plan = planner.plan(fp, hw, ctx=ctx, margin=margin, mtp=False)  # the trunk's placement against naive ones
    # the naive ones carry no prediction, only the planned GPUs (so the engine hands llama.cpp the same devices)
    gpus = [planner.DevicePlan(d.name, 0, 0, 0, 0) for d in plan.devices if d.name != "CPU"]
    return {
        "planned": plan,
        "experts-on-cpu": replace(plan, n_gpu_layers=999, tensor_overrides=[(EXPERTS, "CPU")], tensor_split=None,
                                  devices=gpus),
        "ngl-only": replace(plan, n_gpu_layers=_ngl_only(fp, plan), tensor_overrides=[], devices=gpus),
    }


def measure(path: Path, placement, n_tokens: int, repeat: int = 1) -> dict:
    with Engine.load(path, placement) as eng:
        prompt = eng.tokenize("[gMASK]<sop><|user|>\n" + "Tell me about mixture of experts. " * 40 + "<|assistant|>")
        no_eog = Sampling(temperature=0, logit_bias={t: float("-inf") for t in eng.eog_ids})
        list(eng.generate(prompt[:32], no_eog, max_tokens=8))  # warm-up: page in weights, start threads
        runs = []
        for _ in range(repeat):  # best of `repeat`: a shared machine only ever slows a run down
            eng.reset()
            runs.append(list(eng.generate(prompt, no_eog, max_tokens=n_tokens))[-1].stats)
        st = max(runs, key=lambda r: r.tokens_per_s)
        prompt_best = max(r.prompt_tokens_per_s for r in runs)
        real = {dev: sum(kinds.values()) for dev, kinds in llama_log.buffers_by_device(eng.report.buffers).items()}
    predicted = {d.name: d.total for d in getattr(placement, "devices", []) if d.total}
    return {"prompt_tok_s": prompt_best, "decode_tok_s": st.tokens_per_s, "real_bytes": real,
            "predicted_bytes": predicted, "flags": placement.llama_cpp_flags()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="generations per placement; the fastest counts")
    ap.add_argument("--rpc", type=int, default=0, help="start N local RPC servers and use them as the GPUs")
    ap.add_argument("--gpu-mem", help="GPU budgets, e.g. 26MiB,26MiB (default: what the devices report)")
    ap.add_argument("--margin-mib", type=float, help="free memory left per GPU (default: the planner's 1 GiB)")
    ap.add_argument("--no-mmap", action="store_true", help="load without mmap (the CPU's buffers then hold exactly "
                    "its tensors; with mmap llama.cpp maps the whole file range they span)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(rpc.RpcServer(threads=1)) for _ in range(args.rpc)]
        for srv in servers:
            rpc.add_rpc_server(srv.endpoint)
        rpc_devs = tuple((d.name, d.free_bytes, d.total_bytes) for d in ggml.gpu_devices() if d.name.startswith("RPC"))
        hw = hardware.probe(PlanOptions(gpu_mem=args.gpu_mem), rpc_devices=rpc_devs)
        margin = int(args.margin_mib * MIB) if args.margin_mib is not None else planner.GPU_MARGIN
        plans = placements(args.gguf, args.ctx, hw, margin)
        if args.no_mmap:
            plans = {name: replace(p, use_mmap=False) for name, p in plans.items()}
        results = {name: measure(args.gguf, p, args.tokens, args.repeat) for name, p in plans.items()}
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _report(results: dict) -> None:
    base = results["planned"]["decode_tok_s"] or 1e-9
    for name, r in results.items():
        real = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sorted(r["real_bytes"].items()))
        pred = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sorted(r["predicted_bytes"].items())) or "n/a"
        print(f"{name:15s} prompt {r['prompt_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.2f} tok/s  "
              f"ratio {r['decode_tok_s'] / base:5.2f}\n{'':15s} real: {real}\n{'':15s} predicted: {pred}\n"
              f"{'':15s} {r['flags']}")


if __name__ == "__main__":
    sys.exit(main())
