"""Pure placement: footprint + hardware + wanted context -> where every tensor lives (a Placement).

Priorities (the ones users and llama.cpp's `--fit` converged on):
1. What every token touches stays on the GPUs: attention, dense FFN, shared expert, router, the
   output layer, the KV cache and the compute buffers, with a safety margin per device.
2. Remaining VRAM is filled with whole layers' routed experts (the largest first), per GPU within
   that GPU's own layers, so several GPUs share the experts; the rest stay in RAM (`-ot ...=CPU`).
3. If even (1) does not fit, an automatic context shrinks (multiples of 256, not below 4096); then
   the first layers leave the GPU entirely (-ngl counts from the end).
4. If RAM + VRAM cannot hold the model, PlanError says the largest context or smaller quant that fits.
5. Unified memory (Apple Silicon, DGX Spark, AMD APUs; Hardware.unified): the GPU's bytes come out of the same
   RAM, so they are counted there once; its share is the OS limit, and glmlocal.plan.pool says when raising
   that limit would put the whole model on the GPU.
6. Once the context and the GPU layers are fixed (with llama.cpp's default ubatch, 512), glmlocal.plan.tune
   decides MTP (the NextN block and an MTP context beside the last layer, when it fits and pays) and the ubatch
   (the fastest predicted prompt): both only take VRAM that would hold routed experts, never context.
   The contexts are sized for default_parallel's sequences, which share one KV pool of n_ctx tokens.

GPUs are whatever llama.cpp offloads to (hardware.GPU: CUDA0, RPC0, ...), named as llama.cpp names
them. How the compute buffers split between a GPU and the CPU depends on the backend: CUDA runs
big-batch ops on RAM-resident weights itself (op_offload); RPC (or --no-op-offload) leaves them to
the CPU backend, and then glmlocal.plan.graph_sched replays llama.cpp's scheduler for the buffers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from glmlocal.errors import InputError, PlanError
from glmlocal.plan.estimate import PROMPT_REF
from glmlocal.plan.footprint import (  # re-exported: planner is the public entry point
    Footprint,
    LayerFootprint,
    compute_buffer_bytes,
    compute_buffers_split,
    footprint_from_gguf,
    footprint_from_spec,
    kv_row_bytes,
)
from glmlocal.plan.hardware import GIB, Hardware, probe
from glmlocal.plan.layout import (
    Budget,
    Layout,
    bytes_of,
    fits_gpu,
    fits_host,
    gpu_tensors,
    kv_layer_bytes,
    layout,
    shared_need,
)
from glmlocal.plan.mtp import mtp_overrides
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.placement import (  # re-exported: they used to live here
    DevicePlan,
    Placement,
)
from glmlocal.plan.pool import pool_notes, raise_target
from glmlocal.plan.speed import CPU_EFFICIENCY, GPU_EFFICIENCY, SPEED_CTX
from glmlocal.plan.tune import Choice, mtp_note, prompt_note, tune
from glmlocal.plan.view import gib

__all__ = [
    "DevicePlan",
    "Footprint",
    "LayerFootprint",
    "Placement",
    "compute_buffer_bytes",
    "compute_buffers_split",
    "default_parallel",
    "footprint_from_gguf",
    "footprint_from_spec",
    "plan",
]

GPU_MARGIN = 1 * GIB  # free VRAM left per device, as llama.cpp's --fit (-fitt 1024 MiB)
HOST_RESERVE = 2 * GIB  # RAM left for the OS, the Python process and page cache churn
DEFAULT_CTX = 65536  # agents (Claude Code) want >= 64K; clipped to the model's trained context
MIN_CTX = 4096  # as llama.cpp's --fit (-fitc 4096)
CTX_STEP = 256  # llama.cpp pads n_ctx to a multiple of 256
BASE_UBATCH = 512  # llama.cpp's default n_ubatch: the context search uses it, tune.py may raise it
CONVERSATION = 8192  # tokens of one conversation when counting how many share the KV pool
MAX_DEFAULT_PARALLEL = 8  # serve's default --parallel at most (the engine takes up to engine.params.MAX_PARALLEL)


# --------------------------------------------------------------------------------------------
# Search: how many layers leave the GPU, how much context fits
# --------------------------------------------------------------------------------------------
def _best_layout(b: Budget, ctx: int) -> Layout | None:
    """The layout keeping the most layers on GPU at this context; None if RAM cannot hold the rest."""
    n_trunk = b.fp.n_layer
    lay = layout(b, ctx, 0)
    if b.hw.gpus and not fits_gpu(b, lay):
        lo, hi = 1, n_trunk  # smallest number of CPU layers that makes the GPUs fit (monotone)
        while lo < hi:
            mid = (lo + hi) // 2
            if fits_gpu(b, layout(b, ctx, mid)):
                hi = mid
            else:
                lo = mid + 1
        lay = layout(b, ctx, lo)  # lo == n_trunk: not even one layer fits, CPU only
    return lay if fits_host(b, lay) else None


def _all_on_gpu(b: Budget, ctx: int) -> bool:
    return bool(b.hw.gpus) and fits_gpu(b, layout(b, ctx, 0))


def _largest_ctx(b: Budget, lo: int, hi: int, ok) -> int | None:
    """Largest multiple of CTX_STEP in [lo, hi] with ok(ctx), assuming ok is monotone decreasing."""
    lo_s, hi_s = -(-lo // CTX_STEP), hi // CTX_STEP
    if hi_s < lo_s or not ok(lo_s * CTX_STEP):
        return None
    while lo_s < hi_s:
        mid = (lo_s + hi_s + 1) // 2
        if ok(mid * CTX_STEP):
            lo_s = mid
        else:
            hi_s = mid - 1
    return lo_s * CTX_STEP


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def plan(footprint: Footprint, hardware: Hardware, ctx: int | None = None, kv_type: str = "f16", *,
         kv_type_v: str | None = None, n_batch: int | None = None, n_ubatch: int | None = None,
         margin: int = GPU_MARGIN, host_reserve: int = HOST_RESERVE, min_ctx: int = MIN_CTX,
         alternatives: Mapping[str, Footprint] | None = None, op_offload: bool = True, mtp: bool | None = None,
         n_seq: int | None = None, prompt_ref: int = PROMPT_REF) -> Placement:
    """Place `footprint` on `hardware` with `ctx` tokens of context (None: the largest that fits,
    at most 64K). An explicit ctx is never shrunk: if it does not fit, PlanError names the largest
    one that does. `alternatives` (quant -> Footprint) lets the error name a smaller quant that fits.
    `op_offload=False` plans for llama.cpp's --no-op-offload (big-batch ops on RAM weights stay on the CPU).
    `n_ubatch` fixes the ubatch (None: the one with the fastest predicted prompt, glmlocal.plan.tune);
    `mtp`: None plans MTP when it fits and pays, True when it fits, False never (glmlocal.plan.tune); `n_seq` sizes the contexts for
    that many parallel sequences sharing the KV pool (None: default_parallel's count for the context found).
    """
    type_v = kv_type_v or kv_type
    kv_row_bytes(kv_type, 256), kv_row_bytes(type_v, 256)  # validates the names
    if ctx is not None and ctx < 1:
        raise InputError(f"context must be positive, got {ctx}")
    if n_ubatch is not None and n_ubatch < 1:
        raise InputError(f"ubatch must be positive, got {n_ubatch}")
    b = Budget(footprint, hardware, kv_type, type_v, n_ubatch or BASE_UBATCH, margin, host_reserve, op_offload,
               prompt_ref=prompt_ref)
    notes: list[str] = []
    if ctx is None:
        want = min(footprint.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
        lay = _auto_ctx_layout(b, want, min_ctx, notes)
    else:
        want = -(-ctx // CTX_STEP) * CTX_STEP
        lay = _best_layout(b, want)
        if ctx > footprint.n_ctx_train > 0:
            notes.append(f"context {ctx} exceeds the trained context {footprint.n_ctx_train}")
    if lay is None:
        raise _no_fit_error(b, want, min_ctx, alternatives)
    b = replace(b, n_seq=n_seq or parallel_for_context(lay.ctx))
    choice = tune(b, lay, want_mtp=mtp, ubatch=n_ubatch, relayout=_relayout(lay, min_ctx),
                  speed=lambda bb, ll: _tokens_per_s(_device_plans(bb, ll)))
    return _placement(choice, n_batch, notes + pool_notes(b, lay, want))  # the trunk alone, as unified_raise


def _relayout(base: Layout, min_ctx: int):
    """tune's Relayout: the base layout's GPU layers at its context, or (`shrink`) at the largest context, down
    to min_ctx, that keeps them."""

    def at(b: Budget, shrink: bool) -> Layout | None:
        n_cpu = b.fp.n_layer - sum(len(r) for r in base.gpu_layers)
        if shrink:
            ctx = _largest_ctx(b, min(min_ctx, base.ctx), base.ctx, lambda c: _fits(b, layout(b, c, n_cpu)))
            return layout(b, ctx, n_cpu) if ctx is not None else None
        new = layout(b, base.ctx, n_cpu)
        return new if _fits(b, new) else None

    return at


def _fits(b: Budget, lay: Layout) -> bool:
    return fits_gpu(b, lay) and fits_host(b, lay)


def parallel_for_context(n_ctx: int) -> int:
    """default_parallel's rule for an n_ctx-token KV pool."""
    return max(1, min(MAX_DEFAULT_PARALLEL, n_ctx // CONVERSATION))


def default_parallel(placement: Placement) -> int:
    """serve's default --parallel for a placement: how many CONVERSATION-token (8K) conversations its KV pool
    holds, clamped to 1..MAX_DEFAULT_PARALLEL. The engine keeps ONE pool of n_ctx tokens for every sequence (kv_unified),
    so this is a count of comfortable conversations, not a split: one conversation alone may use all n_ctx
    (Claude Code's 64K), and the sequences of a busy server share the pool (8K each is an agent's side request or
    a sub-agent's first turns). The plan's buffers are sized for this many (Placement.parallel); more sequences
    add a row of logits each (n_vocab floats) to the output buffers, which the 1 GiB margin absorbs."""
    return parallel_for_context(placement.n_ctx)


def unified_raise(footprint: Footprint, hardware: Hardware, ctx: int | None = None, kv_type: str = "f16") -> int | None:
    """On a unified-memory machine: the GPU limit (bytes) to raise to so that plan() with these arguments puts
    the whole model (and the wanted context) on the GPU; None when no raise is needed or possible."""
    b = Budget(footprint, hardware, kv_type, kv_type, 512, GPU_MARGIN, HOST_RESERVE)
    want = -(-ctx // CTX_STEP) * CTX_STEP if ctx else min(footprint.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
    lay = _best_layout(b, want) if ctx else _auto_ctx_layout(b, want, MIN_CTX, [])
    return raise_target(b, lay, want) if lay is not None else None


def plan_gguf(path: str | Path, options: PlanOptions | None = None, hw: Hardware | None = None) -> Placement:
    """The placement of the GGUF at `path` on `hw` (None: this machine, probed with the user's options)."""
    options = options or PlanOptions()
    hw = hw or probe(options)
    return plan(footprint_from_gguf(path), hw, ctx=options.ctx, kv_type=options.kv_type or "f16",
                n_ubatch=options.ubatch, mtp=options.mtp, n_seq=options.parallel)


def _auto_ctx_layout(b: Budget, want: int, min_ctx: int, notes: list[str]) -> Layout | None:
    """Shrink the context first to keep every layer's attention on GPU, then to fit RAM."""
    ctx = want
    if b.hw.gpus and not _all_on_gpu(b, want):
        best = _largest_ctx(b, min_ctx, want, lambda c: _all_on_gpu(b, c))
        if best is not None:
            keep = (f" (--ctx {want} keeps it, running the first layers on the CPU)"
                    if _best_layout(b, want) is not None else "")
            notes.append(f"context reduced from {want} to {best} so attention and KV stay on the GPU{keep}")
            ctx = best
    lay = _best_layout(b, ctx)
    if lay is None:
        best = _largest_ctx(b, min_ctx, ctx, lambda c: _best_layout(b, c) is not None)
        if best is None:
            return None
        notes.append(f"context reduced from {ctx} to {best} to fit in RAM + VRAM")
        lay = _best_layout(b, best)
    return lay


def _no_fit_error(b: Budget, want: int, min_ctx: int, alternatives) -> PlanError:
    fp, hw = b.fp, b.hw
    vram = sum(max(g.free - b.margin, 0) for g in hw.gpus if not g.unified)  # a unified GPU's share is RAM
    have = vram + max(hw.ram_available - b.host_reserve, 0)
    need = fp.weights_bytes + kv_layer_bytes(b, want) * fp.n_layer
    what = f"{fp.label} {fp.quant} with {want} tokens of context needs about {gib(need)}"
    kind = "one unified pool" if hw.unified is not None else "VRAM + RAM"
    usable = f"{what}; {hw.label} has {gib(have)} usable ({kind})"
    largest = _largest_ctx(b, min(min_ctx, want), want, lambda c: _best_layout(b, c) is not None)
    if largest is not None:
        return PlanError(usable, hint=f"the largest context that fits is {largest} (--ctx {largest})")
    for quant, alt in (alternatives or {}).items():
        alt_b = replace(b, fp=alt)
        if _best_layout(alt_b, min(want, max(min_ctx, CTX_STEP))) is not None:
            return PlanError(usable, hint=f"--quant {quant} fits")
    return PlanError(usable, hint="no smaller quant fits either: add RAM or GPUs, or pick a smaller model")


# --------------------------------------------------------------------------------------------
# Placement from a layout
# --------------------------------------------------------------------------------------------
def _cpu_expert_tensors(fp: Footprint, on_gpu: dict[int, set[str]]) -> dict[int, list[str]]:
    """layer -> its routed-expert tensors that stay in RAM."""
    out = {}
    for layer in fp.trunk:
        names = [n for n, _ in layer.expert_tensors if n not in on_gpu.get(layer.index, ())]
        if names:
            out[layer.index] = names
    return out


def _kind(name: str) -> str:
    """'blk.7.ffn_down_exps.weight' -> 'down'."""
    return re.search(r"ffn_(\w+)_exps", name).group(1)


def _expert_overrides(fp: Footprint, on_gpu: dict[int, set[str]]) -> list[tuple[str, str]]:
    """`-ot` patterns: one listing every layer whose experts all stay in RAM, one per partial layer."""
    cpu = _cpu_expert_tensors(fp, on_gpu)
    whole = [i for i, names in cpu.items() if len(names) == len(fp.layers[i].expert_tensors)]
    out = [(rf"blk\.({'|'.join(map(str, whole))})\.ffn_(up|down|gate)_exps", "CPU")] if whole else []
    for i, names in cpu.items():
        if i not in whole:
            kinds = "|".join(_kind(n) for n in names)
            out.append((rf"blk\.{i}\.ffn_({kinds})_exps", "CPU"))
    return out


def _placement(c: Choice, n_batch: int | None, notes: list[str]) -> Placement:
    b, lay = c.b, c.lay
    fp, hw = b.fp, b.hw
    on_gpu_experts = gpu_tensors(lay)
    devices = _device_plans(b, lay)
    n_gpus_used = sum(1 for run in lay.gpu_layers if run)
    split = None
    if n_gpus_used > 1:  # tensor_split in layer slots; the NextN slot and output go to the last GPU
        split = [float(len(run)) for run in lay.gpu_layers]
        split[-1] += fp.n_nextn + 1
    est = _tokens_per_s(devices)
    overrides = _expert_overrides(fp, on_gpu_experts) if lay.ngl else []
    if lay.mtp is not None and lay.ngl:
        overrides += mtp_overrides(fp, experts_in_ram=not lay.mtp_experts_gpu)
    top = max(c.estimates, key=lambda e: e.speedup, default=None)
    notes = notes + _explain(b, lay, devices, est) + c.notes + mtp_note(c) + [prompt_note(c), _pool_note(b, lay)]
    return Placement(
        n_gpu_layers=lay.ngl, tensor_overrides=overrides, tensor_split=split, main_gpu=0, n_ctx=lay.ctx,
        type_k=b.type_k, type_v=b.type_v, flash_attn=True, n_batch=n_batch or b.n_ubatch, n_ubatch=b.n_ubatch,
        n_threads=hw.cores, use_mmap=True, devices=devices, est_tokens_per_s=est, notes=notes,
        model=f"{fp.label} {fp.quant}", op_offload=b.op_offload, mtp=lay.mtp is not None,
        mtp_draft=top.n_draft if top else 0, mtp_estimates=c.estimates,
        est_prompt_tokens_per_s=round(b.prompt_ref / c.prompt_s, 1) if c.prompt_s else 0.0,
        est_ttft_s=round(c.prompt_s, 1), prompt_ref=b.prompt_ref, parallel=b.n_seq,
    )


def _pool_note(b: Budget, lay: Layout) -> str:
    n = parallel_for_context(lay.ctx)
    return (f"KV pool of {lay.ctx} tokens shared by all sequences (kv_unified): one conversation may use all of "
            f"it; serve --parallel defaults to {n} (= {lay.ctx} // {CONVERSATION}, clamped to 1..{MAX_DEFAULT_PARALLEL}: "
            + (f"{n} conversations of {lay.ctx // n} tokens each fit)" if n > 1 else f"one conversation of {lay.ctx} tokens fits)"))


def _device_plans(b: Budget, lay: Layout) -> list[DevicePlan]:
    fp, out = b.fp, []
    on_gpu_experts = gpu_tensors(lay)
    kv_tok_layer = kv_layer_bytes(b, 1)
    for d, gpu in enumerate(b.hw.gpus[: len(lay.gpu_layers)]):
        run, exps = lay.gpu_layers[d], lay.gpu_experts[d]
        expert_bytes = bytes_of(fp, exps)
        read = lay.gpu_fixed[d] + _active(fp, expert_bytes) + kv_tok_layer * SPEED_CTX * len(run)
        out.append(DevicePlan(gpu.device_name, lay.gpu_fixed[d] + expert_bytes, lay.gpu_kv[d],
                              lay.gpu_compute[d], gpu.free, tuple(run), tuple(exps), gpu.bandwidth, read,
                              mtp=lay.gpu_mtp[d]))
    cpu_layers = [layer.index for layer in fp.trunk][: fp.n_layer - sum(len(r) for r in lay.gpu_layers)]
    cpu_exps = _cpu_expert_tensors(fp, on_gpu_experts)
    weights = lay.host_need - lay.host_kv - lay.host_compute - lay.host_mtp
    cpu_expert_bytes = fp.expert_bytes - sum(bytes_of(fp, exps) for exps in lay.gpu_experts)
    read = sum(fp.layers[i].non_expert for i in cpu_layers) + _active(fp, cpu_expert_bytes)
    read += kv_tok_layer * SPEED_CTX * len(cpu_layers) + (fp.output if not lay.ngl else 0)
    ram = b.hw.ram_available - shared_need(b, lay)  # unified memory: what the GPU takes is not the CPU's
    out.append(DevicePlan("CPU", weights, lay.host_kv, lay.host_compute, ram,
                          tuple(cpu_layers), tuple(cpu_exps), b.hw.cpu_bandwidth, read,
                          _repack_on_cpu(fp, set(cpu_layers), cpu_exps, output=not lay.ngl), mtp=lay.host_mtp))
    return out


def _repack_on_cpu(fp: Footprint, cpu_layers: set[int], cpu_exps: dict[int, list[str]], *, output: bool) -> int:
    """Bytes of the RAM-resident weights llama.cpp's CPU backend repacks (a CPU_REPACK buffer holds them:
    with mmap that is a copy on top of the mapped file, without mmap it replaces their part of the CPU buffer)."""
    in_ram = {n for names in cpu_exps.values() for n in names}
    total = 0
    for name, nbytes in fp.repack.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            total += nbytes if output else 0  # output.weight (token_embd never repacks)
        elif int(m.group(1)) < fp.n_layer and (int(m.group(1)) in cpu_layers or name in in_ram):
            total += nbytes
    return total


def _active(fp: Footprint, expert_bytes: int) -> int:
    """Expert bytes one token reads: only the used experts of each layer."""
    return expert_bytes * fp.n_expert_used // max(fp.n_expert, 1)


def _tokens_per_s(devices: list[DevicePlan]) -> float:
    """Decode is serial through the layers, so per-token times of the devices add up."""
    seconds = 0.0
    for d in devices:
        eff = CPU_EFFICIENCY if d.name == "CPU" else GPU_EFFICIENCY
        if d.bytes_per_token and d.bandwidth:
            seconds += d.bytes_per_token / (d.bandwidth * eff)
    return 1.0 / seconds if seconds else 0.0


def _explain(b: Budget, lay: Layout, devices: list[DevicePlan], est: float) -> list[str]:
    fp = b.fp
    on_gpu = gpu_tensors(lay)
    whole = sum(1 for i, names in on_gpu.items() if len(names) == len(fp.layers[i].expert_tensors))
    partial = [f"{i} ({', '.join(_kind(n) for n in sorted(names))})"
               for i, names in on_gpu.items() if len(names) < len(fp.layers[i].expert_tensors)]
    n_moe = sum(1 for layer in fp.trunk if layer.experts)
    lines = []
    if b.hw.gpus and lay.ngl:
        lines.append(f"routed experts of {whole}/{n_moe} MoE layers on GPU"
                     + (f", part of layer {', '.join(partial)}" if partial else "") + ", the rest in RAM")
        if lay.ngl < fp.n_layer_all + 1:
            lines.append(f"{fp.n_layer - sum(len(r) for r in lay.gpu_layers)} first layers run entirely on CPU")
    elif b.hw.gpus:
        lines.append("the GPUs cannot hold even the output layer and compute buffers: running on CPU")
    parts = [f"{d.name} {gib(d.bytes_per_token, 2)} at {d.bandwidth / 1e9:.0f} GB/s" for d in devices
             if d.bytes_per_token]
    lines.append(
        f"speed estimate {est:.1f} tok/s = 1 / sum(bytes read per token / (bandwidth x efficiency)); "
        f"per token: {'; '.join(parts)}; experts count {fp.n_expert_used}/{fp.n_expert} of their bytes; "
        f"efficiency GPU {GPU_EFFICIENCY}, CPU {CPU_EFFICIENCY}; KV read at {SPEED_CTX} tokens")
    if b.type_v != "f16" or b.type_k != "f16":
        lines.append("quantized KV cache: needs flash attention (on); may slightly reduce tool-call accuracy")
    return lines
