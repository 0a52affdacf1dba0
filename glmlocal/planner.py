"""Pure placement: footprint + hardware + wanted context -> where every tensor lives (a Placement).

Priorities (the ones users and llama.cpp's `--fit` converged on):
1. What every token touches stays on the GPUs: attention, dense FFN, shared expert, router, the
   output layer, the KV cache and the compute buffers, with a safety margin per device.
2. Remaining VRAM is filled with whole layers' routed experts (the largest first), per GPU within
   that GPU's own layers, so several GPUs share the experts; the rest stay in RAM (`-ot ...=CPU`).
3. If even (1) does not fit, an automatic context shrinks (multiples of 256, not below 4096); then
   the first layers leave the GPU entirely (-ngl counts from the end).
4. If RAM + VRAM cannot hold the model, PlanError says the largest context or smaller quant that fits.

GPUs are whatever llama.cpp offloads to (hardware.GPU: CUDA0, RPC0, ...), named as llama.cpp names
them. How the compute buffers split between a GPU and the CPU depends on the backend: CUDA runs
big-batch ops on RAM-resident weights itself (op_offload); RPC (or --no-op-offload) leaves them to
the CPU backend, and then glmlocal.compute_graph replays llama.cpp's scheduler for the buffers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from glmlocal.errors import InputError, PlanError
from glmlocal.footprint import (  # re-exported: planner is the public entry point
    Footprint,
    LayerFootprint,
    compute_buffer_bytes,
    compute_buffers_split,
    footprint_from_gguf,
    footprint_from_spec,
    kv_row_bytes,
)
from glmlocal.hardware import GIB, Hardware

__all__ = [
    "DevicePlan",
    "Footprint",
    "LayerFootprint",
    "Placement",
    "compute_buffer_bytes",
    "footprint_from_gguf",
    "footprint_from_spec",
    "plan",
]

GPU_MARGIN = 1 * GIB  # free VRAM left per device, as llama.cpp's --fit (-fitt 1024 MiB)
HOST_RESERVE = 2 * GIB  # RAM left for the OS, the Python process and page cache churn
DEFAULT_CTX = 65536  # agents (Claude Code) want >= 64K; clipped to the model's trained context
MIN_CTX = 4096  # as llama.cpp's --fit (-fitc 4096)
CTX_STEP = 256  # llama.cpp pads n_ctx to a multiple of 256
SPEED_CTX = 4096  # tokens/s is estimated with this many tokens already in the KV cache
GPU_EFFICIENCY = 0.75  # fraction of peak memory bandwidth decode reaches (weights stream once/token)
CPU_EFFICIENCY = 0.60


@dataclass(frozen=True)
class DevicePlan:
    """Predicted bytes on one device, named as llama.cpp names it ("CUDA0", "RPC0", ... or "CPU")."""

    name: str
    weights: int
    kv: int
    compute: int
    capacity: int  # free VRAM, or available RAM
    layers: tuple[int, ...] = ()  # layer indices whose attention lives here
    expert_layers: tuple[int, ...] = ()  # layer indices with (some of) their routed experts here
    bandwidth: float = 0.0
    bytes_per_token: int = 0  # read per decoded token (active experts only)
    # CPU: the part of `weights` llama.cpp's CPU backend repacks into CPU_REPACK buffers (Footprint.repack).
    # Without mmap that is where those bytes live; with mmap it is an anonymous copy on top of the mapped
    # file, whose pages for those tensors are read once at load and then left to the page cache.
    repack: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    @property
    def headroom(self) -> int:
        return self.capacity - self.total


@dataclass(frozen=True)
class Placement:
    """Everything llama.cpp needs to load the model as planned (see llama_cpp_flags())."""

    n_gpu_layers: int
    tensor_overrides: list[tuple[str, str]]
    tensor_split: list[float] | None
    main_gpu: int
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    n_threads: int
    use_mmap: bool
    devices: list[DevicePlan]
    est_tokens_per_s: float
    notes: list[str] = field(default_factory=list)
    model: str = ""
    op_offload: bool = True  # llama.cpp's op_offload (--no-op-offload turns it off)

    @classmethod
    def cpu_only(cls, ctx: int, threads: int, *, type_k: str = "f16", type_v: str = "f16",
                 n_batch: int = 512, n_ubatch: int = 512) -> Placement:
        """A placement with nothing offloaded (no prediction attached)."""
        return cls(0, [], None, 0, ctx, type_k, type_v, True, n_batch, n_ubatch, threads, True, [], 0.0,
                   ["CPU only"])

    def llama_cpp_flags(self) -> str:
        """The equivalent llama-server / llama-cli flags."""
        flags = [f"-ngl {self.n_gpu_layers}"]
        if self.tensor_split:
            flags.append("-ts " + ",".join(f"{x:g}" for x in self.tensor_split))
            flags.append(f"-mg {self.main_gpu}")
        flags += [f'-ot "{pattern}={buft}"' for pattern, buft in self.tensor_overrides]
        flags += [f"-c {self.n_ctx}", f"-ctk {self.type_k}", f"-ctv {self.type_v}",
                  f"-fa {'on' if self.flash_attn else 'off'}", f"-b {self.n_batch}", f"-ub {self.n_ubatch}",
                  f"-t {self.n_threads}"]
        if not self.use_mmap:
            flags.append("--no-mmap")
        if not self.op_offload:
            flags.append("--no-op-offload")
        return " ".join(flags)

    def to_dict(self) -> dict:
        """JSON-ready form (bytes as integers)."""
        from dataclasses import asdict

        d = asdict(self)
        d["llama_cpp_flags"] = self.llama_cpp_flags()
        return d


# --------------------------------------------------------------------------------------------
# Layout of one context size
# --------------------------------------------------------------------------------------------
@dataclass
class _Budget:
    """Inputs shared by every attempt."""

    fp: Footprint
    hw: Hardware
    type_k: str
    type_v: str
    n_ubatch: int
    margin: int
    host_reserve: int
    op_offload: bool = True

    @property
    def offload_gpu(self) -> int | None:
        """Index of the GPU that runs big-batch ops on RAM weights (llama.cpp picks the first backend
        whose offload_op accepts them), or None: then they run on the CPU backend."""
        if not self.op_offload:
            return None
        return next((d for d, g in enumerate(self.hw.gpus) if g.op_offload), None)


@dataclass
class _Layout:
    ctx: int
    ngl: int  # as llama.cpp counts: layer slots from the end, output layer included
    gpu_layers: list[list[int]]  # per GPU: trunk layer indices (attention etc.) on it
    gpu_experts: list[dict[int, tuple[str, ...]]]  # per GPU: layer -> its expert tensors on that GPU
    gpu_need: list[int]
    gpu_fixed: list[int]
    gpu_kv: list[int]
    gpu_compute: list[int]
    host_need: int
    host_kv: int
    host_compute: int


def _kv_layer_bytes(b: _Budget, ctx: int) -> int:
    kv_dim = b.fp.n_head_kv * b.fp.head_dim
    return (kv_row_bytes(b.type_k, kv_dim) + kv_row_bytes(b.type_v, kv_dim)) * ctx


def _compute(b: _Budget, ctx: int, *, output: bool = True) -> int:
    """llama.cpp's compute buffer for this budget (flash attention on, as every Placement has it)."""
    return compute_buffer_bytes(b.fp, ctx, b.n_ubatch, output=output, type_k=b.type_k, type_v=b.type_v)


def _split_layers(layers: list[int], weights: list[float]) -> list[list[int]]:
    """Contiguous runs of `layers`, sized proportionally to `weights` (one run per GPU)."""
    total, out, start, acc = sum(weights), [], 0, 0.0
    for i, w in enumerate(weights):
        acc += w
        end = len(layers) if i == len(weights) - 1 else round(len(layers) * acc / total)
        out.append(layers[start:end])
        start = end
    return out


OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda offloads ops on host weights for batches of at least this size


def _layout(b: _Budget, ctx: int, n_cpu_layers: int) -> _Layout:
    """Place the first `n_cpu_layers` trunk layers on CPU, the rest on the GPUs, then fill experts.

    During prompt processing (batches >= 32) llama.cpp runs ops whose weights are in RAM on the first
    GPU (ggml_backend_sched "op_offload"), copying the weight into that GPU's compute buffer first;
    each such op starts a new split so the copies reuse one slot (llama.cpp PR #15346 copies only the
    used experts, but the slot keeps the full tensor size). So CUDA0 reserves the largest one.
    Without op_offload (RPC devices, --no-op-offload) ops run where their weights are: the compute
    buffers then come from replaying llama.cpp's scheduler over this very placement (once to refill
    the experts with them, once more for the final figures).
    """
    lay = _layout_with_copy(b, ctx, n_cpu_layers, 0)
    if lay.ngl and b.offload_gpu is None:
        comps = _split_compute(b, lay)
        for _ in range(4):  # more experts on a GPU grow its buffer: refill until the estimate covers it
            lay = _layout_with_copy(b, ctx, n_cpu_layers, 0, comps)
            final = _split_compute(b, lay)
            if all(f <= c for f, c in zip(final[:-1], comps[:-1])):
                break
            comps = tuple(max(x, y) for x, y in zip(comps, final))
        return _with_compute(b, lay, final)
    if lay.ngl and b.offload_gpu is not None and min(b.n_ubatch, ctx) >= OP_OFFLOAD_MIN_BATCH:
        copy = _largest_ram_split(b.fp, lay)
        if copy:
            lay = _layout_with_copy(b, ctx, n_cpu_layers, copy)
    return lay


def _largest_ram_split(fp: Footprint, lay: _Layout) -> int:
    """Bytes of the largest weight tensor left in RAM (every such tensor starts its own split, so the
    copies do not pile up); bounded by the largest expert tensor of the model so a refill stays valid."""
    on_gpu_layers = {i for run in lay.gpu_layers for i in run}
    on_gpu = _gpu_tensors(lay)
    in_ram = [nb for layer in fp.trunk for n, nb in layer.expert_tensors if n not in on_gpu.get(layer.index, ())]
    if not in_ram and on_gpu_layers == {layer.index for layer in fp.trunk}:
        return 0
    largest = max((nb for layer in fp.trunk for _, nb in layer.expert_tensors), default=0)
    cpu_layers = [fp.layers[i].non_expert for i in range(fp.n_layer) if i not in on_gpu_layers]
    return max([largest, *cpu_layers])


def _split_compute(b: _Budget, lay: _Layout) -> tuple[int, ...]:
    """Per-backend compute buffers (GPUs, then CPU) for this layout, ops following their weights."""
    fp, cpu, last = b.fp, len(lay.gpu_layers), len(lay.gpu_layers) - 1
    dev_of = {i: d for d, run in enumerate(lay.gpu_layers) for i in run}
    layers = []
    for layer in fp.trunk:
        d = dev_of.get(layer.index, cpu)
        on = lay.gpu_experts[d].get(layer.index, ()) if d != cpu else ()
        layers.append((d, *(d if f"blk.{layer.index}.ffn_{k}_exps.weight" in on else cpu
                             for k in ("up", "gate", "down"))))
    return compute_buffers_split(fp, lay.ctx, b.n_ubatch, (cpu + 1, last, tuple(layers)),
                                 type_k=b.type_k, type_v=b.type_v)


def _with_compute(b: _Budget, lay: _Layout, comps: tuple[int, ...]) -> _Layout:
    """`lay` with the given per-GPU compute buffers and host compute (+ the one-row output buffer)."""
    gpu_compute = list(comps[:-1])
    need = [n - c + nc for n, c, nc in zip(lay.gpu_need, lay.gpu_compute, gpu_compute)]
    host_compute = comps[-1] + b.fp.n_vocab * 4
    return replace(lay, gpu_compute=gpu_compute, gpu_need=need, host_compute=host_compute,
                   host_need=lay.host_need - lay.host_compute + host_compute)


def _layout_with_copy(b: _Budget, ctx: int, n_cpu_layers: int, copy: int,
                      comps: tuple[int, ...] | None = None) -> _Layout:
    fp = b.fp
    trunk = [layer.index for layer in fp.trunk]
    gpus = b.hw.gpus if n_cpu_layers < len(trunk) else ()
    on_gpu = trunk[n_cpu_layers:] if gpus else []
    capacities = [max(g.free - b.margin, 0) for g in gpus]
    runs = _split_layers(on_gpu, capacities) if gpus else []
    kv_layer = _kv_layer_bytes(b, ctx)
    compute = _compute(b, ctx, output=False)
    fixed, kv, comp, experts, need = [], [], [], [], []
    for d, run in enumerate(runs):  # the output layer (and the unloaded NextN slot) go to the last GPU
        last = d == len(runs) - 1
        c = compute + (_compute(b, ctx) - compute if last else 0) + (copy if d == b.offload_gpu else 0)
        c = comps[d] if comps else c
        f = sum(fp.layers[i].non_expert for i in run) + (fp.output if last else 0)
        k = kv_layer * len(run)
        chosen = _fill_experts(fp, run, capacities[d] - f - k - c)
        fixed.append(f), kv.append(k), comp.append(c), experts.append(chosen)
        need.append(f + k + c + _bytes_of(fp, chosen))
    host_kv = kv_layer * (len(trunk) - len(on_gpu))
    gpu_expert_bytes = sum(_bytes_of(fp, chosen) for chosen in experts)
    host_weights = fp.token_embd + fp.expert_bytes - gpu_expert_bytes + sum(
        fp.layers[i].non_expert for i in trunk[: len(trunk) - len(on_gpu)])
    if not gpus:
        host_weights += fp.output
    # With GPUs, big-batch ops on RAM weights run on the GPU (op_offload), so the host compute buffer
    # keeps the token embeddings, plus the attention (mask, activations) of layers whose KV is in RAM;
    # the output buffer holds one row of logits.
    if not gpus:
        host_compute = _compute(b, ctx)
    else:
        host_compute = 2 * fp.n_embd * 4 * min(b.n_ubatch, ctx)
        if len(on_gpu) < len(trunk):
            host_compute += _compute(b, ctx, output=False)
    host_compute += fp.n_vocab * 4
    if comps:
        host_compute = comps[-1] + fp.n_vocab * 4
    ngl = (len(on_gpu) + fp.n_nextn + 1) if on_gpu else 0
    return _Layout(ctx, ngl, runs, experts, need, fixed, kv, comp,
                   host_weights + host_kv + host_compute, host_kv, host_compute)


def _fill_experts(fp: Footprint, run: list[int], room: int) -> dict[int, tuple[str, ...]]:
    """Expert tensors of `run`'s layers that fit in `room` bytes.

    Whole layers first (largest first, then smaller ones into the gaps), then, like llama.cpp's
    --fit, one more layer in part: as many of its gate/up/down expert tensors as still fit.
    """
    chosen: dict[int, tuple[str, ...]] = {}
    for i in sorted((i for i in run if fp.layers[i].experts), key=lambda i: -fp.layers[i].experts):
        if fp.layers[i].experts <= room:
            chosen[i] = tuple(name for name, _ in fp.layers[i].expert_tensors)
            room -= fp.layers[i].experts
    best: tuple[int, int, tuple[str, ...]] = (0, -1, ())
    for i in (i for i in run if fp.layers[i].experts and i not in chosen):
        part, left = [], room
        for name, nbytes in sorted(fp.layers[i].expert_tensors, key=lambda t: -t[1]):
            if nbytes <= left:
                part.append(name)
                left -= nbytes
        if room - left > best[0]:
            best = (room - left, i, tuple(sorted(part)))
    if best[1] >= 0:
        chosen[best[1]] = best[2]
    return dict(sorted(chosen.items()))


def _bytes_of(fp: Footprint, chosen: dict[int, tuple[str, ...]]) -> int:
    return sum(nbytes for i, names in chosen.items() for name, nbytes in fp.layers[i].expert_tensors
               if name in names)


def _fits_gpu(b: _Budget, lay: _Layout) -> bool:
    caps = [max(g.free - b.margin, 0) for g in b.hw.gpus][: len(lay.gpu_fixed)]
    return all(f + k + c <= cap for f, k, c, cap in zip(lay.gpu_fixed, lay.gpu_kv, lay.gpu_compute, caps))


def _fits_host(b: _Budget, lay: _Layout) -> bool:
    return lay.host_need <= b.hw.ram_available - b.host_reserve


def _best_layout(b: _Budget, ctx: int) -> _Layout | None:
    """The layout keeping the most layers on GPU at this context; None if RAM cannot hold the rest."""
    n_trunk = b.fp.n_layer
    lay = _layout(b, ctx, 0)
    if b.hw.gpus and not _fits_gpu(b, lay):
        lo, hi = 1, n_trunk  # smallest number of CPU layers that makes the GPUs fit (monotone)
        while lo < hi:
            mid = (lo + hi) // 2
            if _fits_gpu(b, _layout(b, ctx, mid)):
                hi = mid
            else:
                lo = mid + 1
        lay = _layout(b, ctx, lo)  # lo == n_trunk: not even one layer fits, CPU only
    return lay if _fits_host(b, lay) else None


def _all_on_gpu(b: _Budget, ctx: int) -> bool:
    return bool(b.hw.gpus) and _fits_gpu(b, _layout(b, ctx, 0))


def _largest_ctx(b: _Budget, lo: int, hi: int, ok) -> int | None:
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
         kv_type_v: str | None = None, n_batch: int | None = None, n_ubatch: int = 512,
         margin: int = GPU_MARGIN, host_reserve: int = HOST_RESERVE, min_ctx: int = MIN_CTX,
         alternatives: Mapping[str, Footprint] | None = None, op_offload: bool = True) -> Placement:
    """Place `footprint` on `hardware` with `ctx` tokens of context (None: the largest that fits,
    at most 64K). An explicit ctx is never shrunk: if it does not fit, PlanError names the largest
    one that does. `alternatives` (quant -> Footprint) lets the error name a smaller quant that fits.
    `op_offload=False` plans for llama.cpp's --no-op-offload (big-batch ops on RAM weights stay on the CPU).
    """
    type_v = kv_type_v or kv_type
    kv_row_bytes(kv_type, 256), kv_row_bytes(type_v, 256)  # validates the names
    if ctx is not None and ctx < 1:
        raise InputError(f"context must be positive, got {ctx}")
    b = _Budget(footprint, hardware, kv_type, type_v, n_ubatch, margin, host_reserve, op_offload)
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
    return _placement(b, lay, n_batch, notes)


def _auto_ctx_layout(b: _Budget, want: int, min_ctx: int, notes: list[str]) -> _Layout | None:
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


def _no_fit_error(b: _Budget, want: int, min_ctx: int, alternatives) -> PlanError:
    fp, hw = b.fp, b.hw
    vram = sum(max(g.free - b.margin, 0) for g in hw.gpus)
    have = vram + max(hw.ram_available - b.host_reserve, 0)
    need = fp.weights_bytes + _kv_layer_bytes(b, want) * fp.n_layer
    what = f"{fp.label} {fp.quant} with {want} tokens of context needs about {need / GIB:.1f} GiB"
    largest = _largest_ctx(b, min(min_ctx, want), want, lambda c: _best_layout(b, c) is not None)
    if largest is not None:
        return PlanError(f"{what}; this machine has {have / GIB:.1f} GiB usable (VRAM + RAM)",
                         hint=f"the largest context that fits is {largest} (--ctx {largest})")
    for quant, alt in (alternatives or {}).items():
        alt_b = replace(b, fp=alt)
        if _best_layout(alt_b, min(want, max(min_ctx, CTX_STEP))) is not None:
            return PlanError(f"{what}; this machine has {have / GIB:.1f} GiB usable (VRAM + RAM)",
                             hint=f"--quant {quant} fits")
    return PlanError(f"{what}; this machine has {have / GIB:.1f} GiB usable (VRAM + RAM)",
                     hint="no smaller quant fits either: add RAM or GPUs, or pick a smaller model")


# --------------------------------------------------------------------------------------------
# Placement from a layout
# --------------------------------------------------------------------------------------------
def _gpu_tensors(lay: _Layout) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for chosen in lay.gpu_experts:
        for i, names in chosen.items():
            out.setdefault(i, set()).update(names)
    return out


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


def _placement(b: _Budget, lay: _Layout, n_batch: int | None, notes: list[str]) -> Placement:
    fp, hw = b.fp, b.hw
    on_gpu_experts = _gpu_tensors(lay)
    devices = _device_plans(b, lay, on_gpu_experts)
    n_gpus_used = sum(1 for run in lay.gpu_layers if run)
    split = None
    if n_gpus_used > 1:  # tensor_split in layer slots; the NextN slot and output go to the last GPU
        split = [float(len(run)) for run in lay.gpu_layers]
        split[-1] += fp.n_nextn + 1
    est = _tokens_per_s(devices)
    notes = notes + _explain(b, lay, devices, est)
    return Placement(
        n_gpu_layers=lay.ngl, tensor_overrides=_expert_overrides(fp, on_gpu_experts) if lay.ngl else [],
        tensor_split=split, main_gpu=0, n_ctx=lay.ctx, type_k=b.type_k, type_v=b.type_v, flash_attn=True,
        n_batch=n_batch or (2048 if lay.ngl else 512), n_ubatch=b.n_ubatch, n_threads=hw.cores,
        use_mmap=True, devices=devices, est_tokens_per_s=est, notes=notes, model=f"{fp.label} {fp.quant}",
        op_offload=b.op_offload,
    )


def _device_plans(b: _Budget, lay: _Layout, on_gpu_experts: dict[int, set[str]]) -> list[DevicePlan]:
    fp, out = b.fp, []
    kv_tok_layer = _kv_layer_bytes(b, 1)
    for d, gpu in enumerate(b.hw.gpus[: len(lay.gpu_layers)]):
        run, exps = lay.gpu_layers[d], lay.gpu_experts[d]
        expert_bytes = _bytes_of(fp, exps)
        read = lay.gpu_fixed[d] + _active(fp, expert_bytes) + kv_tok_layer * SPEED_CTX * len(run)
        out.append(DevicePlan(gpu.device_name, lay.gpu_fixed[d] + expert_bytes, lay.gpu_kv[d],
                              lay.gpu_compute[d], gpu.free, tuple(run), tuple(exps), gpu.bandwidth, read))
    cpu_layers = [layer.index for layer in fp.trunk][: fp.n_layer - sum(len(r) for r in lay.gpu_layers)]
    cpu_exps = _cpu_expert_tensors(fp, on_gpu_experts)
    weights = lay.host_need - lay.host_kv - lay.host_compute
    cpu_expert_bytes = fp.expert_bytes - sum(_bytes_of(fp, exps) for exps in lay.gpu_experts)
    read = sum(fp.layers[i].non_expert for i in cpu_layers) + _active(fp, cpu_expert_bytes)
    read += kv_tok_layer * SPEED_CTX * len(cpu_layers) + (fp.output if not lay.ngl else 0)
    out.append(DevicePlan("CPU", weights, lay.host_kv, lay.host_compute, b.hw.ram_available,
                          tuple(cpu_layers), tuple(cpu_exps), b.hw.cpu_bandwidth, read,
                          _repack_on_cpu(fp, set(cpu_layers), cpu_exps, output=not lay.ngl)))
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


def _explain(b: _Budget, lay: _Layout, devices: list[DevicePlan], est: float) -> list[str]:
    fp = b.fp
    on_gpu = _gpu_tensors(lay)
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
    parts = [f"{d.name} {d.bytes_per_token / 1e9:.2f} GB / {d.bandwidth / 1e9:.0f} GB/s" for d in devices
             if d.bytes_per_token]
    lines.append(
        f"speed estimate {est:.1f} tok/s = 1 / sum(bytes read per token / (bandwidth x efficiency)); "
        f"per token: {'; '.join(parts)}; experts count {fp.n_expert_used}/{fp.n_expert} of their bytes; "
        f"efficiency GPU {GPU_EFFICIENCY}, CPU {CPU_EFFICIENCY}; KV read at {SPEED_CTX} tokens")
    if b.type_v != "f16" or b.type_k != "f16":
        lines.append("quantized KV cache: needs flash attention (on); may slightly reduce tool-call accuracy")
    return lines
