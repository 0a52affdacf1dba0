"""One candidate layout for the planner: given a context size and how many leading layers run on the
CPU, which trunk layers and routed-expert tensors each GPU holds and the bytes each device then needs.

Pure bookkeeping over a Footprint; glmlocal.plan.planner searches over these layouts and turns the chosen
one into a Placement. Compute buffers come from glmlocal.plan.footprint (a replay of llama.cpp's allocator,
and of its scheduler when big-batch ops follow their weights: RPC devices, --no-op-offload).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from glmlocal.plan.footprint import (
    Footprint,
    compute_buffer_bytes,
    compute_buffers_split,
    kv_row_bytes,
)
from glmlocal.plan.hardware import Hardware
from glmlocal.plan.mtp import MtpCost, mtp_cost


@dataclass
class Budget:
    """Inputs shared by every attempt."""

    fp: Footprint
    hw: Hardware
    type_k: str
    type_v: str
    n_ubatch: int
    margin: int
    host_reserve: int
    op_offload: bool = True
    mtp: bool = False  # load the NextN block and budget an MTP context (glmlocal.plan.mtp)
    n_seq: int = 1  # sequences the contexts are sized for (n_seq_max; one shared KV pool)
    n_batch: int = 0  # the main context's n_batch (0: n_ubatch)
    prompt_ref: int = 20_000  # the prompt whose time to first token the plan predicts (agents resend 20-30K)

    @property
    def offload_gpu(self) -> int | None:
        """Index of the GPU that runs big-batch ops on RAM weights (llama.cpp picks the first backend
        whose offload_op accepts them), or None: then they run on the CPU backend."""
        if not self.op_offload:
            return None
        return next((d for d, g in enumerate(self.hw.gpus) if g.op_offload), None)


@dataclass
class Layout:
    """Where everything goes at one context size: per GPU (in order) and for the host, in bytes."""

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
    gpu_mtp: list[int] = field(default_factory=list)  # per GPU: MTP's weights, KV and compute there
    host_mtp: int = 0  # MTP's bytes in RAM
    mtp: MtpCost | None = None  # set when the layout carries MTP
    mtp_experts_gpu: bool = False  # the NextN block's routed experts on the last GPU (else in RAM)


def kv_layer_bytes(b: Budget, ctx: int) -> int:
    """K + V bytes of one layer for `ctx` tokens."""
    kv_dim = b.fp.n_head_kv * b.fp.head_dim
    return (kv_row_bytes(b.type_k, kv_dim) + kv_row_bytes(b.type_v, kv_dim)) * ctx


def _compute(b: Budget, ctx: int, *, output: bool = True) -> int:
    """llama.cpp's compute buffer for this budget (flash attention on, as every Placement has it); with MTP the
    main context also runs with the NextN hidden rows of every token (embeddings_nextn, unmasked)."""
    return compute_buffer_bytes(b.fp, ctx, b.n_ubatch, output=output, type_k=b.type_k, type_v=b.type_v,
                                n_seq=b.n_seq, h_all=b.mtp)


def _mtp(b: Budget, ctx: int, gpus: tuple) -> MtpCost | None:
    """MTP's costs when this budget carries it: on GPUs that run big-batch ops themselves, or CPU only (with
    RPC / --no-op-offload the MTP context's buffers are not predicted, so MTP is not planned there)."""
    if not b.mtp or (gpus and b.offload_gpu is None):
        return None
    return mtp_cost(b.fp, ctx, n_ubatch=b.n_ubatch, n_batch=b.n_batch or b.n_ubatch, n_seq=b.n_seq,
                    type_k=b.type_k, type_v=b.type_v)


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


def layout(b: Budget, ctx: int, n_cpu_layers: int) -> Layout:
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


def _largest_ram_split(fp: Footprint, lay: Layout) -> int:
    """Bytes of the largest weight tensor left in RAM (every such tensor starts its own split, so the
    copies do not pile up); bounded by the largest expert tensor of the model so a refill stays valid."""
    on_gpu_layers = {i for run in lay.gpu_layers for i in run}
    on_gpu = gpu_tensors(lay)
    in_ram = [nb for layer in fp.trunk for n, nb in layer.expert_tensors if n not in on_gpu.get(layer.index, ())]
    if not in_ram and on_gpu_layers == {layer.index for layer in fp.trunk}:
        return 0
    largest = max((nb for layer in fp.trunk for _, nb in layer.expert_tensors), default=0)
    cpu_layers = [fp.layers[i].non_expert for i in range(fp.n_layer) if i not in on_gpu_layers]
    return max([largest, *cpu_layers])


def _split_compute(b: Budget, lay: Layout) -> tuple[int, ...]:
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


def _with_compute(b: Budget, lay: Layout, comps: tuple[int, ...]) -> Layout:
    """`lay` with the given per-GPU compute buffers and host compute (+ the one-row output buffer)."""
    gpu_compute = list(comps[:-1])
    need = [n - c + nc for n, c, nc in zip(lay.gpu_need, lay.gpu_compute, gpu_compute)]
    host_compute = comps[-1] + b.fp.n_vocab * 4 * b.n_seq
    return replace(lay, gpu_compute=gpu_compute, gpu_need=need, host_compute=host_compute,
                   host_need=lay.host_need - lay.host_compute + host_compute)


def _layout_with_copy(b: Budget, ctx: int, n_cpu_layers: int, copy: int,
                      comps: tuple[int, ...] | None = None) -> Layout:
    fp = b.fp
    trunk = [layer.index for layer in fp.trunk]
    gpus = b.hw.gpus if n_cpu_layers < len(trunk) else ()
    on_gpu = trunk[n_cpu_layers:] if gpus else []
    capacities = [max(g.free - b.margin, 0) for g in gpus]
    runs = _split_layers(on_gpu, capacities) if gpus else []
    kv_layer = kv_layer_bytes(b, ctx)
    compute = _compute(b, ctx, output=False)
    mtp = _mtp(b, ctx, gpus)
    slot = mtp.largest_expert if mtp and min(b.n_ubatch, ctx) >= OP_OFFLOAD_MIN_BATCH else 0
    fixed, kv, comp, experts, need, beside = [], [], [], [], [], []
    mtp_gpu = False
    for d, run in enumerate(runs):  # the output layer (and the NextN slot) go to the last GPU
        last = d == len(runs) - 1
        c = compute + (_compute(b, ctx) - compute if last else 0) + (copy if d == b.offload_gpu else 0)
        c = comps[d] if comps else c
        f = sum(fp.layers[i].non_expert for i in run) + (fp.output if last else 0)
        k = kv_layer * len(run)
        m = (mtp.beside_last_layer if mtp and last else 0) + (slot if d == b.offload_gpu else 0)
        room = capacities[d] - f - k - c - m
        chosen = _fill_experts(fp, run, room)
        if mtp and last and mtp.experts <= room - bytes_of(fp, chosen) + (slot if d == b.offload_gpu else 0):
            mtp_gpu = True  # the NextN experts fit after the trunk's: no copy slot for them
        fixed.append(f), kv.append(k), comp.append(c), experts.append(chosen), beside.append(m)
    if mtp_gpu:
        beside = [m - (slot if d == b.offload_gpu else 0) for d, m in enumerate(beside)]
        beside[-1] += mtp.experts
    need = [f + k + c + m + bytes_of(fp, e) for f, k, c, m, e in zip(fixed, kv, comp, beside, experts)]
    host_kv = kv_layer * (len(trunk) - len(on_gpu))
    gpu_expert_bytes = sum(bytes_of(fp, chosen) for chosen in experts)
    host_weights = fp.token_embd + fp.expert_bytes - gpu_expert_bytes + sum(
        fp.layers[i].non_expert for i in trunk[: len(trunk) - len(on_gpu)])
    if not gpus:
        host_weights += fp.output
    # With GPUs, big-batch ops on RAM weights run on the GPU (op_offload), so the host compute buffer
    # keeps the token embeddings, plus the attention (mask, activations) of layers whose KV is in RAM;
    # the output buffer holds one row of logits per sequence.
    if not gpus:
        host_compute = _compute(b, ctx)
    else:
        host_compute = 2 * fp.n_embd * 4 * min(b.n_ubatch, ctx)
        if len(on_gpu) < len(trunk):
            host_compute += _compute(b, ctx, output=False)
    host_compute += fp.n_vocab * 4 * b.n_seq
    if comps:
        host_compute = comps[-1] + fp.n_vocab * 4 * b.n_seq
    host_mtp = 0
    if mtp:
        host_mtp = mtp.host + (mtp.embd + (0 if mtp_gpu else mtp.experts) if gpus else
                               mtp.weights + mtp.embd + mtp.experts + mtp.kv + mtp.compute)
    ngl = (len(on_gpu) + fp.n_nextn + 1) if on_gpu else 0
    return Layout(ctx, ngl, runs, experts, need, fixed, kv, comp,
                  host_weights + host_kv + host_compute + host_mtp, host_kv, host_compute,
                  beside, host_mtp, mtp, mtp_gpu)


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


def bytes_of(fp: Footprint, chosen: dict[int, tuple[str, ...]]) -> int:
    """Bytes of the chosen expert tensors (layer -> tensor names)."""
    return sum(nbytes for i, names in chosen.items() for name, nbytes in fp.layers[i].expert_tensors
               if name in names)


def fits_gpu(b: Budget, lay: Layout) -> bool:
    """Whether every GPU holds its trunk layers, KV and compute buffer (experts are fitted to what is left)."""
    caps = [max(g.free - b.margin, 0) for g in b.hw.gpus][: len(lay.gpu_fixed)]
    return all(f + k + c + m <= cap for f, k, c, m, cap in
               zip(lay.gpu_fixed, lay.gpu_kv, lay.gpu_compute, lay.gpu_mtp, caps))


def fits_host(b: Budget, lay: Layout) -> bool:
    """Whether RAM (less the host reserve) holds everything left to the CPU, and what unified-memory GPUs hold
    (their weights, KV and buffers are in the same RAM: counted there once; mmapped weights are not counted
    again as page cache)."""
    return lay.host_need + shared_need(b, lay) <= b.hw.ram_available - b.host_reserve


def shared_need(b: Budget, lay: Layout) -> int:
    """Bytes the unified-memory GPUs of this layout take from RAM."""
    return sum(need for need, g in zip(lay.gpu_need, b.hw.gpus) if g.unified)


def gpu_tensors(lay: Layout) -> dict[int, set[str]]:
    """layer -> its routed-expert tensors on some GPU."""
    out: dict[int, set[str]] = {}
    for chosen in lay.gpu_experts:
        for i, names in chosen.items():
            out.setdefault(i, set()).update(names)
    return out
