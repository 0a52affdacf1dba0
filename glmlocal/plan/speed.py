"""How fast a layout runs: decode, the verification of drafted tokens, an MTP draft step, prompt processing.

Each device is described by what one step makes it read and compute (`Work`); a step of n tokens takes, per
device, the roofline max(bytes read / (bandwidth x efficiency), FLOPs / effective FLOP/s), and the devices run
one after the other (layers are serial). Bytes per step: the weights every token touches once (attention, shared
expert, router, dense layers, output), the KV of its layers, and of its routed experts the fraction the n tokens
hit: 1 - (1 - used/n_expert)^n (uniform routing; real routing is skewed, so this is an upper bound: llama.cpp PR
#15346 saw 72-95 of 128 experts used by a 512-token batch where uniform routing predicts all of them).

Prompt processing (ubatches of T tokens): with a GPU whose backend offloads big-batch ops (CUDA, Metal, Vulkan:
T >= 32), every matmul runs on a GPU and the weights in RAM are copied to it for each ubatch (only the used experts,
llama.cpp PR #15346), serially with the compute: t(T) = upload / link + sum over GPUs of the roofline (the GPU that
runs the offloaded ops counts their FLOPs), + the CPU's attention over KV in RAM. Link: PCIE_BW (25 GB/s, what a
PCIe 4.0 x16 slot delivers of its 31.5 GB/s; 50 GB/s for PCIe 5.0 cards) or, for a unified-memory GPU, RAM
bandwidth (a copy within RAM). Otherwise (CPU only, T < 32, RPC) each device computes what it holds.
Compute: the FLOPs of the active weights (2 per weight per token) and attention (4 x heads x head_dim per token
per context token) at an effective rate: GPU = PROMPT_EFFICIENCY x dense FP16 tensor peak (GPU_TFLOPS; by
bandwidth when unknown) for the weights and ATTN_EFFICIENCY x peak for flash attention, calibrated on GLM-4.5-Air:
Q4_0 all on GPUs at ubatch 4096 (ik_llama.cpp PR #700, mainline llama.cpp CUDA; 2 x RTX A6000 assumed, the
poster's usual rig): 1349 / 762 / 466 tokens/s at 0 / 16K / 32K tokens of context, predicted 1162 / 686 / 486;
UD-Q4_K_XL on 3 x RTX 3090 at 200 W, 381 tokens/s over an 11K prompt at ubatch 256 (llama.cpp PR #26534),
predicted 451 (at full power). CPU = cores x CPU_FLOPS_PER_CORE,
calibrated on this project's 2-core CPU (AVX-512 VNNI; bench/ubatch.py on a quiet machine, bench1g Q4_K_M fixture:
1816 tokens/s for a 512-token prompt, 1505 for a 2048-token one, the same within 5% at ubatch 128 to 2048;
an earlier llama-bench reading of ~600 was taken on a loaded machine). CPUs without VNNI/AVX-512 are slower. Unchecked on a GPU with experts in RAM: no GPU was lent to this work.

Pure: numbers in, numbers out. glmlocal.plan.planner turns them into the Placement's estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmlocal.plan.footprint import Footprint
from glmlocal.plan.hardware import GPU, Hardware

GPU_EFFICIENCY = 0.75  # fraction of peak memory bandwidth decode reaches (weights stream once per token)
CPU_EFFICIENCY = 0.60
SPEED_CTX = 4096  # decode speed is estimated with this many tokens already in the KV cache
PROMPT_EFFICIENCY = 0.20  # of a GPU's dense FP16 tensor peak, for quantized MoE prompt matmuls
ATTN_EFFICIENCY = 0.40  # of that peak, for flash attention over the KV cache
CPU_FLOPS_PER_CORE = 110e9  # effective prompt FLOP/s per core (quantized matmuls; calibration in the docstring)
PCIE_BW = 25e9  # host -> GPU copies, PCIe 4.0 x16 (pageable mmap memory may give less)
PCIE5_BW = 50e9
OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda runs ops on RAM weights itself from this batch size

# Dense FP16 tensor peak (FLOP/s, FP32 accumulate where GeForce cards halve it), by a substring of the name.
GPU_TFLOPS = {
    "RTX 5090": 209e12, "RTX 5080": 113e12, "RTX 5070 Ti": 88e12, "RTX 5070": 62e12, "RTX 4090": 165e12,
    "RTX 4080": 97e12, "RTX 4070 Ti": 80e12, "RTX 4070": 58e12, "RTX 4060 Ti": 44e12, "RTX 4060": 30e12,
    "RTX 3090 Ti": 80e12, "RTX 3090": 71e12, "RTX 3080 Ti": 68e12, "RTX 3080": 60e12, "RTX 3070": 41e12,
    "RTX 3060": 26e12, "RTX 2080 Ti": 54e12, "RTX A6000": 155e12, "RTX 6000 Ada": 364e12, "RTX PRO 6000": 500e12,
    "A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A40": 150e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
    "RX 7900 XTX": 123e12, "GB10": 125e12, "Apple M4 Max": 17e12, "Apple M3 Ultra": 28e12, "Apple M3 Max": 14e12,
    "Apple M2 Ultra": 27e12, "Apple M1 Max": 10e12, "Radeon 8060S": 30e12,
}
FLOP_PER_BYTE = 71e12 / 936e9  # RTX 3090's peak FP16 per byte of bandwidth: a GPU not in the table
PCIE5 = ("RTX 50", "RTX PRO 6000", "H100", "H200", "B200")


@dataclass(frozen=True)
class Work:
    """What one device reads and computes per step of the trunk."""

    name: str
    gpu: GPU | None  # None: the CPU
    bandwidth: float  # effective bytes/s (peak x efficiency)
    flops: float  # effective FLOP/s of batched matmuls
    attn_rate: float  # effective FLOP/s of attention over the KV cache
    shared: int  # bytes every step reads whatever its tokens: non-expert weights (+ the output layer)
    experts: int  # routed-expert bytes held here
    kv_per_ctx: int  # KV bytes of its layers per token of context
    flops_tok: float  # FLOPs per token of its weights (active experts, no output layer)
    attn_flops: float  # attention FLOPs per token per token of context


def gpu_peak(gpu: GPU) -> float:
    """Dense FP16 tensor FLOP/s of a GPU: the table by name, else in proportion to its bandwidth."""
    hits = [k for k in GPU_TFLOPS if k.lower() in gpu.name.lower()]
    return GPU_TFLOPS[max(hits, key=len)] if hits else gpu.bandwidth * FLOP_PER_BYTE


def link_bandwidth(gpu: GPU, hw: Hardware) -> float:
    """Bytes/s a host -> GPU weight copy reaches (a unified-memory GPU copies within RAM)."""
    if gpu.unified:
        return hw.cpu_bandwidth
    return PCIE5_BW if any(k.lower() in gpu.name.lower() for k in PCIE5) else PCIE_BW


def cpu_flops(hw: Hardware) -> float:
    return max(hw.cores, 1) * CPU_FLOPS_PER_CORE


def layer_flops(fp: Footprint, index: int) -> float:
    """FLOPs per token of one layer's weights other than its routed experts."""
    e, hd = fp.n_embd, fp.head_dim
    attn = e * fp.n_head * hd * 2 + 2 * e * fp.n_head_kv * hd
    if index < fp.n_dense_lead and index < fp.n_layer:
        ffn = 3 * e * (fp.n_ff_dense or fp.n_ff_exp * fp.n_expert_used)
    else:
        ffn = e * fp.n_expert + 3 * e * (fp.n_ff_exp if fp.n_ff_shexp < 0 else fp.n_ff_shexp)
    return 2.0 * (attn + ffn)


def expert_tensor_flops(fp: Footprint) -> float:
    """FLOPs per token of one routed-expert tensor (gate, up or down) of a layer: its used experts only."""
    return 2.0 * fp.n_expert_used * fp.n_embd * fp.n_ff_exp


def attn_flops(fp: Footprint, n_layers: int) -> float:
    """Attention FLOPs per token per token of context (Q.K and the weighted sum of V) over n_layers."""
    return 4.0 * fp.n_head * fp.head_dim * n_layers


def hit_fraction(fp: Footprint, n_tokens: int) -> float:
    """Expected fraction of a layer's experts that n tokens route to (uniform routing)."""
    if not fp.n_expert:
        return 0.0
    return 1.0 - (1.0 - fp.n_expert_used / fp.n_expert) ** max(n_tokens, 0)


def step_seconds(w: Work, fp: Footprint, n_tokens: int, ctx: int) -> float:
    """Roofline time of one device for a step of n_tokens at `ctx` tokens of context."""
    read = w.shared + w.experts * hit_fraction(fp, n_tokens) + w.kv_per_ctx * ctx
    compute = n_tokens * (w.flops_tok / w.flops + w.attn_flops * ctx / w.attn_rate)
    return max(read / w.bandwidth, compute)


def decode_seconds(works: list[Work], fp: Footprint, n_tokens: int = 1, ctx: int = SPEED_CTX) -> float:
    """One decode step of n_tokens of one sequence (1: plain decoding; 1 + k: verifying k drafts)."""
    return sum(step_seconds(w, fp, n_tokens, ctx) for w in works)


def ubatch_seconds(works: list[Work], fp: Footprint, hw: Hardware, n_tokens: int, ctx: int,
                   offload: int | None) -> float:
    """One prompt ubatch of n_tokens whose middle sits at `ctx`; `offload`: index in `works` of the GPU that
    runs big-batch ops on RAM-resident weights (None: no such GPU)."""
    cpu = next((w for w in works if w.gpu is None), None)
    if offload is None or cpu is None or n_tokens < OP_OFFLOAD_MIN_BATCH:
        return sum(step_seconds(w, fp, n_tokens, ctx) for w in works)
    upload = cpu.shared + cpu.experts * hit_fraction(fp, n_tokens)
    total = upload / link_bandwidth(works[offload].gpu, hw)
    total += n_tokens * ctx * cpu.attn_flops / cpu.attn_rate  # the CPU layers' attention, over KV in RAM
    for i, w in enumerate(works):
        if w.gpu is None:
            continue
        read = w.shared + w.experts * hit_fraction(fp, n_tokens) + w.kv_per_ctx * ctx
        weights = w.flops_tok + (cpu.flops_tok if i == offload else 0.0)
        total += max(read / w.bandwidth, n_tokens * (weights / w.flops + w.attn_flops * ctx / w.attn_rate))
    return total


def prompt_seconds(works: list[Work], fp: Footprint, hw: Hardware, n_prompt: int, n_ubatch: int,
                   offload: int | None) -> float:
    """Time to process an n_prompt-token prompt in ubatches of n_ubatch (the time to first token)."""
    total, done = 0.0, 0
    while done < n_prompt:
        n = min(n_ubatch, n_prompt - done)
        total += ubatch_seconds(works, fp, hw, n, done + n // 2, offload)
        done += n
    return total
