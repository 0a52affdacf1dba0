"""Estimates for one layout: what each device does per step (glmlocal.plan.speed's Work), what MTP speculative
decoding is expected to gain, and how fast a prompt is processed.

MTP gain with k drafted tokens per step (one sequence), from published acceptance and the byte/roofline model:

    speedup(k) = (1 + k * a_k) * t(1) / (t(1 + k) + k * t_draft)

- a_k: the fraction of drafted tokens accepted when drafting k per step; GLM-4.5-Air's MTP in ik_llama.cpp
  (PR #1992) accepted 84-100% with one draft, 66-89% with two, 50-73% with three: the midpoints are ACCEPTANCE.
  (GLM-4.6 was reported at an acceptance length of about 2 in SGLang, i.e. close to a_1 = 1, and a second draft
  rarely accepted in vLLM.) So a step emits 1 + k * a_k tokens: the accepted drafts plus the target's own token.
- t(n): one trunk decode step of n tokens (glmlocal.plan.speed.decode_seconds): weights every token touches and
  the KV are read once, routed experts for the union of what the n tokens pick (each extra token brings about
  its own experts' bytes, from VRAM or from RAM wherever they are), each device's time the larger of its bytes /
  bandwidth and its FLOPs / compute rate. Verification of 1 + k tokens is therefore cheap where the step is
  bound by shared weights and dear where it is bound by experts in RAM.
- t_draft: one MTP step: the NextN block's shared weights, its used experts, the LM head (its own or
  output.weight) and its one layer of KV, where they live.
Check against a measurement: GLM-4.5-Air Q4_K_M on 4 x RTX 3090 with one draft token ran 1.17-1.20x faster in
llama.cpp (PR #26534); this formula gives 1.2-1.3x for an all-GPU Air (verification of 2 tokens reads ~1.4x
the bytes of one). The expected speedup is what `plan` prints and `--json` carries per k; MTP stays off when
the best one does not beat the plan without MTP (whose VRAM goes to routed experts instead).
"""

from __future__ import annotations

from glmlocal.plan.layout import Budget, Layout, bytes_of, kv_layer_bytes
from glmlocal.plan.mtp import own_head
from glmlocal.plan.placement import SpecEstimate
from glmlocal.plan.speed import (
    ATTN_EFFICIENCY,
    CPU_EFFICIENCY,
    GPU_EFFICIENCY,
    PROMPT_EFFICIENCY,
    SPEED_CTX,
    Work,
    attn_flops,
    cpu_flops,
    decode_seconds,
    expert_tensor_flops,
    gpu_peak,
    layer_flops,
    prompt_seconds,
)

ACCEPTANCE = {1: 0.92, 2: 0.775, 3: 0.615}  # midpoints of GLM-4.5-Air's published MTP acceptance per k
PROMPT_REF = Budget.prompt_ref  # tokens of the prompt whose time to first token the plan shows


def _n_tensors(chosen: dict[int, tuple[str, ...]]) -> int:
    return sum(len(names) for names in chosen.values())


def works(b: Budget, lay: Layout) -> list[Work]:
    """Per device (GPUs in order, then the CPU) what a trunk step reads and computes."""
    fp, hw, out = b.fp, b.hw, []
    kv_tok = kv_layer_bytes(b, 1)
    per_tensor = expert_tensor_flops(fp)
    for d, run in enumerate(lay.gpu_layers):
        gpu, exps = hw.gpus[d], lay.gpu_experts[d]
        peak = gpu_peak(gpu)
        out.append(Work(gpu.device_name, gpu, gpu.bandwidth * GPU_EFFICIENCY, PROMPT_EFFICIENCY * peak,
                        ATTN_EFFICIENCY * peak, lay.gpu_fixed[d],
                        bytes_of(fp, exps), kv_tok * len(run),
                        sum(layer_flops(fp, i) for i in run) + _n_tensors(exps) * per_tensor,
                        attn_flops(fp, len(run))))
    cpu_layers = [layer.index for layer in fp.trunk][: fp.n_layer - sum(len(r) for r in lay.gpu_layers)]
    on_gpu = sum(bytes_of(fp, e) for e in lay.gpu_experts)
    n_cpu_tensors = sum(len(layer.expert_tensors) for layer in fp.trunk) - sum(map(_n_tensors, lay.gpu_experts))
    shared = sum(fp.layers[i].non_expert for i in cpu_layers) + (fp.output if not lay.ngl else 0)
    out.append(Work("CPU", None, hw.cpu_bandwidth * CPU_EFFICIENCY, cpu_flops(hw), cpu_flops(hw), shared,
                    fp.expert_bytes - on_gpu,
                    kv_tok * len(cpu_layers), sum(layer_flops(fp, i) for i in cpu_layers) + n_cpu_tensors * per_tensor,
                    attn_flops(fp, len(cpu_layers))))
    return out


def draft_works(b: Budget, lay: Layout) -> list[Work]:
    """What one MTP step reads and computes, per device (same order as works()); [] without MTP."""
    fp, mtp = b.fp, lay.mtp
    if mtp is None:
        return []
    layer = fp.mtp_layer
    trunk = works(b, lay)
    head = 0 if own_head(fp) else fp.output
    flops = layer_flops(fp, layer.index) + 2.0 * 2 * fp.n_embd * fp.n_embd  # + eh_proj
    expert_flops = len(layer.expert_tensors) * expert_tensor_flops(fp)
    host, beside = trunk[-1], trunk[-2] if lay.ngl else trunk[-1]
    out = []
    for w in trunk:
        shared = mtp.weights + head if w is beside else 0
        experts = mtp.experts if (w is beside and (lay.mtp_experts_gpu or not lay.ngl)) or (
            w is host and lay.ngl and not lay.mtp_experts_gpu) else 0
        out.append(Work(w.name, w.gpu, w.bandwidth, w.flops, w.attn_rate, shared, experts,
                        kv_layer_bytes(b, 1) if w is beside else 0,
                        (flops if w is beside else 0.0) + (expert_flops if experts else 0.0),
                        attn_flops(fp, 1) if w is beside else 0.0))
    return out


def _offload(b: Budget, lay: Layout) -> int | None:
    """Index (in works()) of the GPU that runs big-batch ops on RAM weights, when the layout uses GPUs."""
    return b.offload_gpu if lay.ngl and b.offload_gpu is not None and b.offload_gpu < len(lay.gpu_layers) else None


def prompt_time(b: Budget, lay: Layout, n_prompt: int | None = None) -> float:
    """Seconds to process an n_prompt-token prompt (default b.prompt_ref; trunk, plus the MTP context's pass
    over the same tokens)."""
    n_prompt = n_prompt or b.prompt_ref
    t = prompt_seconds(works(b, lay), b.fp, b.hw, n_prompt, b.n_ubatch, _offload(b, lay))
    if lay.mtp is not None:
        t += prompt_seconds(draft_works(b, lay), b.fp, b.hw, n_prompt, b.n_ubatch, _offload(b, lay))
    return t


def spec_estimates(b: Budget, lay: Layout, tokens_per_s: float) -> tuple[SpecEstimate, ...]:
    """Expected MTP speculative decoding per draft count (see the module docstring); () without MTP."""
    draft = draft_works(b, lay)
    if not draft:
        return ()
    trunk, fp = works(b, lay), b.fp
    t1 = decode_seconds(trunk, fp)
    t_draft = decode_seconds(draft, fp)
    out = []
    for k, a in ACCEPTANCE.items():
        cost = (decode_seconds(trunk, fp, 1 + k) + k * t_draft) / t1
        tokens = 1 + k * a
        out.append(SpecEstimate(k, a, round(tokens, 3), round(cost, 3), round(tokens / cost, 3),
                                round(tokens_per_s * tokens / cost, 2)))
    return tuple(out)


def best(estimates: tuple[SpecEstimate, ...]) -> SpecEstimate | None:
    return max(estimates, key=lambda e: e.speedup, default=None)


def effective_speed(tokens_per_s: float, estimates: tuple[SpecEstimate, ...]) -> float:
    """Decode tokens/s with the best draft count (plain decoding when MTP is off or does not pay)."""
    top = best(estimates)
    return max(tokens_per_s, top.tokens_per_s) if top else tokens_per_s


__all__ = ["ACCEPTANCE", "PROMPT_REF", "SPEED_CTX", "best", "draft_works", "effective_speed", "prompt_time",
           "spec_estimates", "works"]
