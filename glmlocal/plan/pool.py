"""Planning on unified memory: what a layout means for the one pool, and when raising the OS limit on the
GPU's share would put the whole model on the GPU.

On these machines (Hardware.unified) the GPU's weights, KV cache and compute buffers are in RAM: layout.fits_host
counts them there once, next to what stays on the CPU. The GPU itself may use only gpu_limit of the pool (macOS's
Metal working set, an APU's GTT); whatever does not fit under it runs on the CPU from the same RAM, slower. When
a higher limit would keep everything on the GPU, the plan says by how much and with which command.
"""

from __future__ import annotations

from dataclasses import replace

from glmlocal.plan.hardware import GIB, Hardware
from glmlocal.plan.layout import Budget, Layout, bytes_of, fits_gpu, fits_host, layout
from glmlocal.plan.view import gib


def with_gpu_limit(hw: Hardware, limit: int) -> Hardware:
    """`hw` with its unified GPU allowed `limit` bytes (free grows by as much as the limit)."""
    gpu = hw.gpus[0]
    gpu = replace(gpu, total=limit, free=gpu.free + limit - gpu.total)
    return replace(hw, gpus=(gpu, *hw.gpus[1:]), unified=replace(hw.unified, gpu_limit=limit))


def _single_unified(hw: Hardware) -> bool:
    return hw.unified is not None and len(hw.gpus) == 1 and hw.gpus[0].unified


def all_on_gpu(b: Budget, lay: Layout) -> bool:
    """Every layer, expert and the output on the GPUs."""
    gpu_experts = sum(bytes_of(b.fp, e) for e in lay.gpu_experts)
    return lay.ngl == b.fp.n_layer_all + 1 and gpu_experts == b.fp.expert_bytes


def gpu_limit_needed(b: Budget, ctx: int) -> int | None:
    """The GPU limit (bytes, margin included) at which the whole model and `ctx` tokens of KV sit on the one
    unified GPU; None when not a unified machine or when the pool itself is too small for that."""
    if not _single_unified(b.hw):
        return None
    pool = b.hw.unified.pool
    roomy = replace(b, hw=with_gpu_limit(b.hw, pool))
    lay = layout(roomy, ctx, 0)
    if not (fits_gpu(roomy, lay) and all_on_gpu(roomy, lay) and fits_host(roomy, lay)):
        return None
    return lay.gpu_need[0] + b.margin


def raise_target(b: Budget, lay: Layout, want: int) -> int | None:
    """The GPU limit (whole GiB) to raise to so that `want` tokens of context and everything else sit on the GPU,
    when this layout leaves something to the CPU (or less context) and the OS lets the limit go that high."""
    u = b.hw.unified
    if not _single_unified(b.hw) or not u.raise_how or (all_on_gpu(b, lay) and lay.ctx >= want):
        return None
    need = gpu_limit_needed(b, want)
    if need is None:
        return None
    target = -(-need // GIB) * GIB
    return target if u.gpu_limit < target <= u.limit_max else None


def pool_notes(b: Budget, lay: Layout, want: int) -> list[str]:
    """What the plan means on a unified-memory machine, and the command that would make the model fit the GPU."""
    u = b.hw.unified
    if u is None:
        return []
    lines = [f"unified memory: one {gib(u.pool)} pool; the GPU may use {gib(u.gpu_limit)} of it "
             f"({u.limit_source}); weights on the GPU are counted once"]
    target = raise_target(b, lay, want)
    if target is not None:
        where = "the whole model" + (f" and {want} tokens of context" if lay.ctx < want else "")
        lines.append(f"raising the GPU limit by {gib(target - u.gpu_limit)} to {gib(target, 0)} "
                     f"puts {where} on the GPU: {u.raise_command(target)}")
    elif _single_unified(b.hw) and not all_on_gpu(b, lay):
        need = gpu_limit_needed(b, want)
        if need is not None:
            how = (f"the most {b.hw.label} allows is {gib(u.limit_max, 0)}" if u.raise_how
                   else "it cannot be raised here")
            lines.append(f"the whole model on the GPU needs a {gib(need)} GPU limit; {how}")
    return lines
