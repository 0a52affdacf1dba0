"""Planner: footprints of the real models (checked against published file sizes) and placements for the
hardware users have, with the expected outcome of each scenario written down and asserted.

Hardware in these tables is given by overrides (as `glmlocal plan --gpu-mem/--ram` does), with fixed
bandwidths (RTX 3090-class 936 GB/s, dual-channel DDR5 89.6 GB/s) and 16 cores.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmlocal.errors import InputError, PlanError
from glmlocal.models.registry import get_model
from glmlocal.plan.footprint import footprint_from_spec
from glmlocal.plan.hardware import GIB, probe
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.planner import GPU_MARGIN, HOST_RESERVE, Placement, plan


def fp(model: str, quant: str = "q4_k_m"):
    return footprint_from_spec(get_model(model), quant)


def hw(gpu_mem: str | None, ram: str, cpu_only: bool = False):
    return probe(PlanOptions(gpu_mem=gpu_mem, ram=ram, cpu_only=cpu_only, threads=16, gpu_bw=936, cpu_bw=89.6))


# --------------------------------------------------------------------------------------------
# Footprints from models.toml + the recipe, against files people actually published
# --------------------------------------------------------------------------------------------
def test_spec_footprint_matches_published_file_sizes():
    # unsloth/GLM-4.5-Air-GGUF Q4_K_M, two parts: 72,975,748,384 bytes (tensor data + two headers).
    assert fp("glm-4.5-air").file_bytes == pytest.approx(72_975_748_384, rel=0.005)
    # ubergarm/GLM-4.6-GGUF model card: BF16 664.707 GiB, Q8_0 353.259 GiB (tensor data).
    assert fp("glm-4.6", "bf16").file_bytes / GIB == pytest.approx(664.707, rel=0.001)
    assert fp("glm-4.6", "q8_0").file_bytes / GIB == pytest.approx(353.259, rel=0.001)


def test_kv_bytes_per_token_count_only_trunk_layers():
    big, air = fp("glm-4.6"), fp("glm-4.5-air")
    # 92 (not 93) layers x (K+V) x 8 heads x 128 x 2 bytes; numbers from the llama.cpp reference.
    assert big.kv_bytes_per_token("f16", "f16") == 376_832
    assert big.kv_bytes_per_token("q8_0", "q8_0") == 200_192
    assert big.kv_bytes_per_token("q4_0", "q4_0") == 105_984
    assert air.kv_bytes_per_token() == 188_416 and air.kv_bytes_per_token("q8_0", "q8_0") == 100_096
    with pytest.raises(InputError):
        big.kv_bytes_per_token("q3_k", "f16")


def test_footprint_groups_and_the_unloaded_mtp_layer():
    f = fp("glm-4.6")
    assert f.n_layer == 92 and f.n_layer_all == 93 and f.layers[92].is_nextn
    assert [layer.dense_ffn > 0 for layer in f.layers[:4]] == [True, True, True, False]
    assert all(layer.experts == 0 and layer.router == 0 for layer in f.layers[:3])
    moe = f.layers[10]
    assert moe.experts > 0 and moe.shared_expert > 0 and moe.router > 0 and moe.attention > 0
    # Router stays F32 (5120 x 160 x 4 + bias); experts: 3 tensors, down is Q6_K on use_more_bits layers.
    assert moe.router == 5120 * 160 * 4 + 160 * 4
    assert [name for name, _ in moe.expert_tensors] == [f"blk.10.ffn_{w}_exps.weight" for w in ("down", "gate", "up")]
    assert f.tensor_types["blk.10.ffn_down_exps.weight"] == "Q6_K" and f.tensor_types["blk.12.ffn_down_exps.weight"] == "Q4_K"
    # The MTP block is in the file but not in what llama.cpp allocates.
    assert f.file_bytes == f.weights_bytes + f.layers[92].total
    # Air's FFN rows (1408, 10944) are not multiples of 256: llama.cpp's fallback types.
    assert fp("glm-4.5-air").tensor_types["blk.3.ffn_down_exps.weight"] in ("Q5_0", "Q8_0")


# --------------------------------------------------------------------------------------------
# The scenarios of issue 3
# --------------------------------------------------------------------------------------------
def check_invariants(p: Placement, f, machine):
    """What every plan must satisfy, whatever the scenario."""
    for dev, gpu in zip(p.devices, machine.gpus):
        assert dev.total <= gpu.free - GPU_MARGIN, f"{dev.name} over budget"
    host = p.devices[-1]
    assert host.name == "CPU" and host.total <= machine.ram_available - HOST_RESERVE
    assert p.n_ctx % 256 == 0 and p.flash_attn
    # Every allocated byte of weights is somewhere, exactly once.
    assert sum(d.weights for d in p.devices) == f.weights_bytes
    # The -ot patterns, applied as llama.cpp does (regex_search, per tensor name), move exactly the expert
    # bytes the plan puts in RAM, and never touch a tensor that is not a routed expert.
    if p.n_gpu_layers:
        hits = {n for n in f.tensor_types if any(re.search(pat, n) for pat, _ in p.tensor_overrides)}
        assert all("_exps" in n or n.endswith(".nextn.embed_tokens.weight") for n in hits)
        assert p.mtp or not any(n.startswith(f"blk.{f.n_layer}.") for n in hits)
        on_cpu = sum(nb for layer in f.trunk for n, nb in layer.expert_tensors if n in hits or layer.index in host.layers)
        assert on_cpu == host.weights - f.token_embd - sum(f.layers[i].non_expert for i in host.layers)
    # MTP's bytes come on top of the trunk's: its whole NextN block and one layer of KV at least.
    kv_layer = f.kv_bytes_per_token_layer(p.type_k, p.type_v) * p.n_ctx
    assert sum(d.mtp for d in p.devices) >= f.mtp_weights_bytes + kv_layer if p.mtp else all(
        d.mtp == 0 for d in p.devices)
    # The estimate is the stated formula over the devices.
    seconds = sum(d.bytes_per_token / (d.bandwidth * (0.6 if d.name == "CPU" else 0.75)) for d in p.devices)
    assert p.est_tokens_per_s == pytest.approx(1 / seconds)


def expert_layers_on_cpu(p: Placement, f) -> set[int]:
    """Apply the overrides the way llama.cpp does (std::regex_search on each tensor name)."""
    cpu = set()
    for layer in f.trunk:
        for name, _ in layer.expert_tensors:
            if any(re.search(pat, name) and buft == "CPU" for pat, buft in p.tensor_overrides):
                cpu.add(layer.index)
    return cpu


def test_air_q4_k_m_on_24gb_gpu_and_64gb_ram():
    """Expected: everything every token touches on the GPU with the full default 64K f16 context
    (11.5 GiB KV), the spare VRAM filled with the experts of 4-5 MoE layers (1.3-1.6 GiB each, the
    partial layer counted), the other layers' experts in RAM; -ngl 48 = 46 layers + MTP slot + output;
    10-16 tokens/s."""
    f, m = fp("glm-4.5-air"), hw("24GiB", "64GiB")
    p = plan(f, m)
    check_invariants(p, f, m)
    gpu, cpu = p.devices
    assert p.n_ctx == 65536 and p.n_gpu_layers == 48 and p.tensor_split is None
    assert len(gpu.layers) == 46 and gpu.kv == 188_416 * 65536 and cpu.kv == 0
    assert 4 <= len(gpu.expert_layers) <= 6 and set(gpu.expert_layers) | set(cpu.expert_layers) == set(range(1, 46))
    assert 5 * GIB < gpu.weights - sum(f.layers[i].non_expert for i in range(46)) - f.output < 8 * GIB
    assert expert_layers_on_cpu(p, f) == set(cpu.expert_layers)
    assert 10 < p.est_tokens_per_s < 16
    assert "-ngl 48" in p.llama_cpp_flags() and "-c 65536" in p.llama_cpp_flags()


def test_glm46_q4_k_m_on_24gb_gpu_and_256gb_ram():
    """Expected: attention, shared experts, output and KV of all 92 layers (about 9 GiB of weights)
    fill the card, so the automatic context shrinks from 64K to about 36K (f16 KV); no routed
    experts fit on the GPU, all 89 MoE layers' experts (189 GiB) stay in RAM; about 4-6 tokens/s."""
    f, m = fp("glm-4.6"), hw("24GiB", "256GiB")
    p = plan(f, m)
    check_invariants(p, f, m)
    gpu, cpu = p.devices
    assert 32768 <= p.n_ctx < 65536 and any("context reduced" in n for n in p.notes)
    assert p.n_gpu_layers == 94 and len(gpu.layers) == 92
    assert gpu.expert_layers == () and len(cpu.expert_layers) == 89
    assert expert_layers_on_cpu(p, f) == set(range(3, 92))
    assert 4 < p.est_tokens_per_s < 6


def test_glm46_q4_k_m_on_two_24gb_gpus():
    """Expected: layers split 46/46 (tensor split 46,48: the MTP slot and output go to the last card),
    the full 64K context fits (12.3 GiB KV per card), and BOTH cards get routed experts (never all on
    one card, the --n-cpu-moe failure); llama.cpp's own layer->device rule reproduces our split."""
    f, m = fp("glm-4.6"), hw("24GiB,24GiB", "256GiB")
    p = plan(f, m)
    check_invariants(p, f, m)
    g0, g1, cpu = p.devices
    assert p.n_ctx == 65536 and p.tensor_split == [46.0, 48.0]
    assert g0.layers == tuple(range(46)) and g1.layers == tuple(range(46, 92))
    assert g0.expert_layers and g1.expert_layers
    assert set(g0.expert_layers) <= set(g0.layers) and set(g1.expert_layers) <= set(g1.layers)
    assert expert_layers_on_cpu(p, f) == set(cpu.expert_layers)
    assert llama_cpp_layer_devices(p, f) == {**{i: 0 for i in range(46)}, **{i: 1 for i in range(46, 94)}}
    assert p.est_tokens_per_s > plan(f, hw("24GiB", "256GiB")).est_tokens_per_s


def llama_cpp_layer_devices(p: Placement, f) -> dict[int, int]:
    """llama_model::load_tensors' assignment (src/llama-model.cpp): i_gpu_start, cumulative split points,
    upper_bound; slot n_layer_all is the output layer."""
    import bisect

    n_all = f.n_layer_all
    splits, acc = [], 0.0
    for x in p.tensor_split:
        acc += x
        splits.append(acc)
    splits = [s / acc for s in splits]
    start, act = max(n_all + 1 - p.n_gpu_layers, 0), min(p.n_gpu_layers, n_all + 1)
    return {il: bisect.bisect_right(splits, (il - start) / act) for il in range(start, n_all + 1)}


def test_cpu_only():
    """Expected: nothing offloaded (-ngl 0, no overrides), weights + 64K KV + compute in 128 GiB RAM;
    decode speed set by RAM bandwidth alone: 4-8 tokens/s at 89.6 GB/s."""
    f, m = fp("glm-4.5-air"), hw(None, "128GiB", cpu_only=True)
    p = plan(f, m)
    check_invariants(p, f, m)
    (cpu,) = p.devices
    assert p.n_gpu_layers == 0 and p.tensor_overrides == [] and p.tensor_split is None
    assert cpu.weights == f.weights_bytes and cpu.kv == f.kv_bytes_per_token() * p.n_ctx
    assert p.n_ctx == 65536 and 4 < p.est_tokens_per_s < 8
    assert "-ngl 0" in p.llama_cpp_flags() and "-ot" not in p.llama_cpp_flags()


def test_does_not_fit():
    """Expected: GLM-4.6 Q4_K_M (198 GiB of weights) cannot run in 24 GiB VRAM + 64 GiB RAM: PlanError
    with the sizes; Q8_0 on 24 GiB + 256 GiB does not fit either, and the error names Q6_K, the
    largest smaller quant that does; an explicit context too large names the largest that fits."""
    with pytest.raises(PlanError) as e:
        plan(fp("glm-4.6"), hw("24GiB", "64GiB"))
    assert "GiB" in e.value.one_line() and "no smaller quant" in e.value.one_line()
    alternatives = {"q6_k": fp("glm-4.6", "q6_k"), "q4_k_m": fp("glm-4.6", "q4_k_m")}
    with pytest.raises(PlanError) as e:
        plan(fp("glm-4.6", "q8_0"), hw("24GiB", "256GiB"), alternatives=alternatives)
    assert "--quant q6_k fits" in e.value.one_line()
    with pytest.raises(PlanError) as e:
        plan(fp("glm-4.5-air"), hw("24GiB", "64GiB"), ctx=131072)
    largest = int(re.search(r"--ctx (\d+)", e.value.one_line()).group(1))
    assert 65536 < largest < 131072 and largest % 256 == 0
    plan(fp("glm-4.5-air"), hw("24GiB", "64GiB"), ctx=largest)  # and it really fits


def test_128k_context_with_q8_0_kv():
    """Expected: Air at 131072 tokens with q8_0 K and V: 12.2 GiB of KV stays on the 24 GiB card with
    all attention, leaving room for the experts of 3-5 layers; flags carry -ctk/-ctv q8_0 and -fa on.
    With f16 KV the same context needs 23 GiB of KV alone and cannot keep every layer on the GPU."""
    f, m = fp("glm-4.5-air"), hw("24GiB", "64GiB")
    p = plan(f, m, ctx=131072, kv_type="q8_0")
    check_invariants(p, f, m)
    gpu, _ = p.devices
    assert p.n_ctx == 131072 and (p.type_k, p.type_v) == ("q8_0", "q8_0")
    assert gpu.kv == 100_096 * 131072 and p.n_gpu_layers == 48 and 3 <= len(gpu.expert_layers) <= 5
    assert "-ctk q8_0 -ctv q8_0 -fa on" in p.llama_cpp_flags()
    p16 = plan(f, hw("24GiB", "128GiB"), ctx=131072)
    assert p16.n_ctx == 131072 and p16.n_gpu_layers < 48 and p16.devices[-1].kv > 0


def test_op_offload_weight_copy_is_reserved_on_the_first_gpu():
    """For prompt batches llama.cpp runs RAM-resident expert matmuls on CUDA0, copying the weight into
    its compute buffer: with experts in RAM CUDA0 reserves the largest expert tensor; with the whole
    model on the GPU (Air Q4_K_M on a 96 GiB card) nothing is copied and nothing is overridden."""
    from glmlocal.plan.planner import compute_buffer_bytes

    f = fp("glm-4.5-air")
    largest = max(nb for layer in f.trunk for _, nb in layer.expert_tensors)
    p = plan(f, hw("24GiB", "64GiB"))
    assert p.devices[0].compute == compute_buffer_bytes(f, p.n_ctx, p.n_ubatch) + largest
    p = plan(f, hw("96GiB", "64GiB"), mtp=False)  # MTP keeps its own token embedding in RAM: test_mtp_*
    gpu, cpu = p.devices
    assert p.tensor_overrides == [] and cpu.expert_layers == () and cpu.weights == f.token_embd
    assert gpu.compute == compute_buffer_bytes(f, p.n_ctx, p.n_ubatch)
    assert gpu.weights == f.weights_bytes - f.token_embd  # the input embedding always stays on CPU


def test_partial_offload_when_attention_does_not_fit():
    """A 8 GiB card cannot hold GLM-4.6's 9 GiB of attention weights: the first layers run on CPU,
    -ngl counts from the end (MTP slot and output included), their KV lives in RAM."""
    f, m = fp("glm-4.6"), hw("8GiB", "256GiB")
    p = plan(f, m, ctx=8192)
    check_invariants(p, f, m)
    gpu, cpu = p.devices
    n_gpu = len(gpu.layers)
    assert 0 < n_gpu < 92 and gpu.layers == tuple(range(92 - n_gpu, 92))
    assert p.n_gpu_layers == n_gpu + 2 and cpu.layers == tuple(range(92 - n_gpu))
    assert cpu.kv == len(cpu.layers) * f.kv_bytes_per_token_layer() * 8192


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpus=st.lists(st.integers(4, 96), min_size=0, max_size=3), ram=st.integers(16, 512),
       ctx=st.sampled_from([None, 4096, 32768, 131072]), kv=st.sampled_from(["f16", "q8_0", "q4_0"]),
       model=st.sampled_from(["glm-4.5-air", "glm-4.6"]))
def test_any_machine_gets_a_valid_plan_or_a_plan_error(gpus, ram, ctx, kv, model):
    f = FOOTPRINTS[model]
    m = hw(",".join(f"{g}GiB" for g in gpus) or None, f"{ram}GiB", cpu_only=not gpus)
    try:
        p = plan(f, m, ctx=ctx, kv_type=kv)
    except PlanError:
        return
    check_invariants(p, f, m)
    assert expert_layers_on_cpu(p, f) == set(p.devices[-1].expert_layers) or p.n_gpu_layers == 0
    if ctx:
        assert p.n_ctx == ctx


FOOTPRINTS = {"glm-4.5-air": fp("glm-4.5-air"), "glm-4.6": fp("glm-4.6")}


def test_bad_arguments():
    with pytest.raises(InputError):
        plan(fp("glm-4.5-air"), hw(None, "128GiB", True), kv_type="q3_k")
    with pytest.raises(InputError):
        plan(fp("glm-4.5-air"), hw(None, "128GiB", True), ctx=0)


def test_cpu_only_convenience_constructor():
    p = Placement.cpu_only(8192, 4)
    assert p.n_gpu_layers == 0 and p.n_ctx == 8192 and "-t 4" in p.llama_cpp_flags()


def test_unequal_gpus_get_layers_in_proportion_and_both_get_experts():
    """24 GiB + 48 GiB: the bigger card takes about two thirds of the layers, and each card fills its own
    spare VRAM with experts of its own layers."""
    f, m = fp("glm-4.6"), hw("24GiB,48GiB", "256GiB")
    p = plan(f, m)
    check_invariants(p, f, m)
    g0, g1, _ = p.devices
    assert 25 <= len(g0.layers) <= 36 and len(g0.layers) + len(g1.layers) == 92
    assert g0.expert_layers and len(g1.expert_layers) > len(g0.expert_layers)
    assert llama_cpp_layer_devices(p, f) == {
        **{i: 0 for i in range(len(g0.layers))}, **{i: 1 for i in range(len(g0.layers), 94)}}


def test_split_gguf_parts_are_all_read():
    from pathlib import Path

    from glmlocal.plan.footprint import _split_paths

    parts = _split_paths(Path("/m/Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00005.gguf"))
    assert [p.name for p in parts] == [f"GLM-4.6-Q4_K_M-0000{i}-of-00005.gguf" for i in range(1, 6)]
    assert _split_paths(Path("/m/model.gguf")) == [Path("/m/model.gguf")]
