"""From a planner Placement to llama.cpp's load parameters: which devices, llama_model_params and
llama_context_params, plus the checks done before anything is loaded (a plan that cannot fit).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import llama_cpp.llama_cpp as C

from glmlocal.errors import EngineError, InputError, PlanError
from glmlocal.llama import ggml
from glmlocal.plan.footprint import KV_TYPES
from glmlocal.plan.mtp import MAX_DRAFT, mtp_batch
from glmlocal.plan.placement import Placement
from glmlocal.plan.view import gib
from quantize.ggml import GGMLType

MAX_PARALLEL = 64  # sequences in one context (llama.cpp allows 256; past this a batch is mostly bookkeeping)

def check_fits(placement: Placement) -> None:
    """Refuse, before touching llama.cpp, a placement its own prediction says cannot load: a GPU whose
    weights + KV + compute exceed its free memory (a certain out-of-memory), or a CPU without room for
    KV + compute (weights are memory-mapped and may page)."""
    hint = "run `glmlocal plan MODEL` to see what fits (smaller context, KV type or quant)"
    for dev in placement.devices:
        need = dev.total if dev.name != "CPU" else dev.kv + dev.compute
        if dev.capacity and need > dev.capacity:
            raise PlanError(f"the placement needs {gib(need)} on {dev.name}, which has {gib(dev.capacity)} free",
                            hint=hint)


def device_names(placement: Placement) -> list[str] | None:
    """llama.cpp devices for the placement's GPUs, in its order; None leaves llama.cpp's default (every GPU).

    Planner GPU i is the device the plan names when llama.cpp has one by that name ("RPC1"), else the
    i-th GPU-type device llama.cpp offloads to (a plan made from `--gpu-mem` says "CUDA0" whatever the
    backend). A planned CPU-only placement gets no device at all, so nothing lands on a GPU it did not
    plan for. A placement without per-device predictions (Placement.cpu_only) keeps the default.
    """
    planned = placement.devices
    if not planned:
        return None
    available = [d.name for d in ggml.gpu_devices()]
    wanted = [d.name for d in planned if d.name != "CPU"]
    if not available:
        return None  # a CPU-only build: llama.cpp keeps every layer on the CPU whatever -ngl says
    if len(wanted) > len(available):
        raise EngineError(f"the placement uses {len(wanted)} GPUs ({', '.join(wanted)}) but llama.cpp has "
                          f"{len(available)} ({', '.join(available)})",
                          hint="plan again for this machine (drop --gpu-mem), or add the missing devices")
    chosen: list[str] = []
    for name in wanted:
        pick = name if name in available and name not in chosen else next(a for a in available if a not in chosen)
        chosen.append(pick)
    return chosen


def model_params(placement: Placement, keep: list[object], progress: Callable[[float], None] | None,
                 names: list[str] | None = None) -> C.llama_model_params:
    """llama_model_params for the placement on devices `names`; ctypes arrays and callbacks the params point
    to are appended to `keep`, which must outlive the model."""
    mp = C.llama_model_default_params()
    if names is not None:
        arr_dev = ggml.device_array(names)
        keep.append(arr_dev)
        mp.devices = ctypes.cast(arr_dev, ctypes.c_void_p).value
    mp.n_gpu_layers = int(placement.n_gpu_layers)
    mp.main_gpu = int(placement.main_gpu)
    mp.split_mode = 1  # LLAMA_SPLIT_MODE_LAYER
    mp.load_mode = 1 if placement.use_mmap else 0  # MMAP / NONE
    mp.load_mtp = bool(placement.mtp)  # the NextN block (skipped otherwise) for an MTP context to draft with
    if placement.tensor_overrides:
        arr = ggml.OverrideArray([(str(p), str(b)) for p, b in placement.tensor_overrides])
        keep.append(arr)
        mp.tensor_buft_overrides = arr.pointer
    split = placement.tensor_split
    if split:
        n = C.llama_max_devices()
        if len(split) > n:
            raise EngineError(f"tensor_split has {len(split)} entries; this build supports {n} devices")
        arr_split = (ctypes.c_float * n)(*[float(x) for x in split])
        keep.append(arr_split)
        mp.tensor_split = arr_split
    if progress is not None:
        cb = _progress_callback(progress)
        keep.append(cb)
        mp.progress_callback = cb
    return mp


def _progress_callback(progress: Callable[[float], None]) -> C.llama_progress_callback:
    def _cb(frac: float, _user: int | None) -> bool:
        try:
            progress(float(frac))
        except Exception:  # noqa: BLE001, S110 (never unwind into C; a failing callback does not abort the load)
            pass
        return True

    return C.llama_progress_callback(_cb)


def _kv_type(name: str) -> int:
    """The ggml type id of a KV cache type name (the planner's list of names: plan.footprint.KV_TYPES)."""
    if str(name).lower() not in KV_TYPES:
        raise InputError(f"unknown KV cache type {name!r}", hint=f"use one of {', '.join(KV_TYPES)}")
    return int(GGMLType[str(name).upper()])


def context_params(placement: Placement, n_ctx: int, n_seq: int = 1) -> C.llama_context_params:
    """llama_context_params for the placement with `n_ctx` tokens of context shared by `n_seq` sequences
    (0 threads: llama.cpp's default).

    One unified KV pool (kv_unified) of n_ctx cells, not n_ctx / n_seq per sequence: one conversation may use
    all of it when it runs alone, and a prefix copied between sequences shares cells (engine/batch.py)."""
    cp = C.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = int(placement.n_batch)
    cp.n_ubatch = min(int(placement.n_ubatch), cp.n_batch)
    cp.n_seq_max = int(n_seq)
    cp.kv_unified = True
    if placement.n_threads > 0:
        cp.n_threads = cp.n_threads_batch = int(placement.n_threads)
    cp.flash_attn_type = 1 if placement.flash_attn else 0
    cp.type_k = _kv_type(placement.type_k)
    cp.type_v = _kv_type(placement.type_v)
    cp.no_perf = False
    cp.op_offload = bool(placement.op_offload)
    return cp


def mtp_context_params(placement: Placement, n_ctx: int, n_seq: int = 1,
                       n_draft: int = MAX_DRAFT) -> C.llama_context_params:
    """llama_context_params of the MTP context (llama.cpp's graph_mtp over the NextN block, its own KV of that one
    layer) next to a main context made with context_params(placement, n_ctx, n_seq): same context, sequences, KV
    pool, types and ubatch (the planner counted its compute buffer at that ubatch). The model must have been
    loaded with placement.mtp (load_mtp): without the NextN block llama.cpp aborts building this context.

    n_batch: a prompt chunk's (token, hidden row) pairs plus, per sequence, up to n_draft accepted drafts and the
    draft root (the batch API refuses more entries than n_batch). n_outputs_max = n_seq: every MTP decode may ask
    logits for at most one entry per sequence (the root or a draft step); llama.cpp aborts on more, and the
    planner's compute buffer counts that many rows of logits, not one per token."""
    if not placement.mtp:
        raise EngineError("the placement does not load the NextN block (mtp off): no MTP context",
                          hint="plan with MTP (PlanOptions.mtp) and load with that placement")
    cp = context_params(placement, n_ctx, n_seq)
    cp.ctx_type = C.LLAMA_CONTEXT_TYPE_MTP
    cp.n_batch = mtp_batch(int(placement.n_batch), n_seq, n_draft)
    cp.n_ubatch = min(int(placement.n_ubatch), cp.n_batch)
    cp.n_outputs_max = int(n_seq)
    return cp
