"""Predicted memory vs what llama.cpp really allocates, for fixture GGUFs loaded on CPU.

llama.cpp logs one line per buffer ("CPU_Mapped model buffer size", "CPU KV buffer size",
"CPU compute buffer size", and at teardown "compute buffer size is 26.6973 MiB" with four decimals);
we capture them through llama_log_set and compare with the footprint (header only). Weights, KV,
compute and their total must each be within 5% for every fixture preset and quant, flash attention
on and off, f16 and q8_0 KV, and several n_ctx / n_batch / n_ubatch. The compute prediction replays
ggml-alloc over a rebuilt graph (glmlocal.plan.graph), so it matches to the log's resolution where
a closed formula was off by up to 19% (allocator fragmentation around the logits).
"""

from __future__ import annotations

import re

import pytest

from glmlocal.plan.footprint import footprint_from_gguf
from glmlocal.plan.hardware import GIB, Hardware
from glmlocal.plan.planner import compute_buffer_bytes, plan

llama_cpp = pytest.importorskip("llama_cpp")

_BUF = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
_COMPUTE_EXACT = re.compile(r"(\S+)\s+compute buffer size is\s+([\d.]+) MiB")
_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
MiB = 2**20


def load_and_measure(path, n_ctx: int, n_ubatch: int, kv: str = "f16", *, n_batch: int | None = None,
                     flash_attn: bool = True) -> dict[str, float]:
    """Load with llama.cpp on CPU; return {'CPU_Mapped model': bytes, 'CPU KV': bytes, ...}.

    Log lines are collected through glmlocal.llama.log's process-wide router, so this test does not
    replace the log callback other tests (and the engine) rely on.
    """
    from glmlocal.llama.log import router

    with router().capture() as lines:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch or max(n_ubatch, 512), n_ubatch=n_ubatch,
                              flash_attn=flash_attn, n_gpu_layers=0, n_threads=2, verbose=False,
                              type_k=_TYPES[kv], type_v=_TYPES[kv])
        llm.close()
    text = "\n".join(lines)
    out: dict[str, float] = {}
    for m in _BUF.finditer(text):
        key = f"{m.group(1)} {m.group(2)}"
        out[key] = out.get(key, 0.0) + float(m.group(3)) * MiB
    for m in _COMPUTE_EXACT.finditer(text):  # the teardown line has 100x the resolution
        out[f"{m.group(1)} compute"] = float(m.group(2)) * MiB
    assert out, "llama.cpp logged no buffer sizes"
    return out


def close(predicted: float, measured: float, rel: float = 0.05) -> bool:
    # Log lines have 0.01 MiB resolution; allow that on top of the relative tolerance.
    return abs(predicted - measured) <= rel * measured + 0.006 * MiB


PRESETS = ["tiny", "tiny45", "air", "mid"]
QUANTS = ["q4_k_m", "q8_0", "bf16"]
# (n_ctx, n_batch, n_ubatch, flash_attn, kv type): context below and above the micro-batch, n_batch
# capping n_ubatch, big and small micro-batches, the non-flash path (KQ scores for every head), and a
# q8_0 cache (llama.cpp then rotates Q/K/V with a Hadamard matrix: extra inputs and matmuls).
CONFIGS = [
    (256, 512, 512, True, "f16"), (1024, 512, 512, True, "f16"), (4096, 2048, 512, True, "q8_0"),
    (8192, 512, 128, True, "f16"), (8192, 2048, 2048, True, "f16"), (2048, 256, 512, True, "f16"),
    (1024, 512, 512, False, "f16"), (4096, 512, 128, False, "f16"), (2048, 2048, 2048, False, "f16"),
]


def _predict(fp, n_ctx, n_batch, n_ubatch, fa, kv) -> dict[str, int]:
    return {"weights": fp.weights_bytes, "kv": fp.kv_bytes_per_token(kv, kv) * n_ctx,
            "compute": compute_buffer_bytes(fp, n_ctx, min(n_batch, n_ubatch), flash_attn=fa, type_k=kv)}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", QUANTS)
def test_prediction_matches_llama_cpp(gguf_factory, preset, quant):
    """Weights, KV, compute and the total within 5% of llama.cpp's own buffers, for every config.
    The compute buffer does not depend on the weight types, so the non-q4_k_m quants run a subset."""
    path = gguf_factory(preset, quant)
    fp = footprint_from_gguf(path)
    for cfg in CONFIGS if quant == "q4_k_m" else CONFIGS[::3]:
        n_ctx, n_batch, n_ubatch, fa, kv = cfg
        got = load_and_measure(path, n_ctx, n_ubatch, kv, n_batch=n_batch, flash_attn=fa)
        real = {"weights": got["CPU_Mapped model"], "kv": got["CPU KV"], "compute": got["CPU compute"]}
        pred = _predict(fp, *cfg)
        for part, measured in real.items():
            assert close(pred[part], measured), (cfg, part, pred[part] / MiB, measured / MiB)
        assert close(sum(pred.values()), sum(real.values())), (cfg, pred, real)


def test_compute_prediction_tracks_fragmentation(gguf_factory):
    """Where the logits are the peak, ggml-alloc's free-block fragmentation makes the buffer move
    non-monotonically with n_ctx (tiny: 4.63 MiB at 256, 9.05 at 1024, 7.50 at 2048). A formula
    cannot follow that; the replayed allocator must, to within 0.5%."""
    path = gguf_factory("tiny", "q4_k_m")
    fp = footprint_from_gguf(path)
    for n_ctx in (256, 512, 768, 1024, 1536, 2048, 3072):
        got = load_and_measure(path, n_ctx, 512)["CPU compute"]
        assert close(compute_buffer_bytes(fp, n_ctx, 512), got, 0.005), (n_ctx, got / MiB)


@pytest.mark.parametrize("model", ["glm-4.5-air", "glm-4.6"])
def test_replaying_a_few_layers_equals_the_whole_model(model):
    """The planner replays the dense layers + STEADY_LAYERS MoE layers, not all 46 / 92: the allocator's
    state repeats layer after layer. Check that on the real shapes, flash attention on and off, short
    and long contexts, small and large micro-batches (the fixtures have too few layers to show it)."""
    from glmlocal.models.registry import get_model
    from glmlocal.plan.footprint import footprint_from_spec

    fp = footprint_from_spec(get_model(model), "q4_k_m")
    for n_ctx, n_ubatch, fa, kv in [(4096, 512, True, "f16"), (131072, 2048, True, "q8_0"),
                                    (2048, 128, False, "f16"), (256, 512, True, "f16")]:
        few = compute_buffer_bytes(fp, n_ctx, n_ubatch, flash_attn=fa, type_k=kv)
        assert few == compute_buffer_bytes(fp, n_ctx, n_ubatch, flash_attn=fa, type_k=kv, n_layer=fp.n_layer)


@pytest.mark.slow
def test_compute_buffer_on_the_1gb_fixture(gguf_factory):
    """bench1g has 4 of 64 experts used and a hidden size 1024: wider shapes than the small fixtures."""
    path = gguf_factory("bench1g", "q4_k_m")
    fp = footprint_from_gguf(path)
    for n_ctx, n_ubatch in [(512, 512), (4096, 512), (4096, 128), (8192, 2048)]:
        got = load_and_measure(path, n_ctx, n_ubatch)
        assert close(compute_buffer_bytes(fp, n_ctx, n_ubatch), got["CPU compute"]), (n_ctx, n_ubatch, got)
        assert close(fp.weights_bytes, got["CPU_Mapped model"], 0.005)


@pytest.fixture(scope="module")
def ggufs(gguf_factory):
    return {(p, q): gguf_factory(p, q) for p, q in [("tiny", "q4_k_m"), ("air", "q4_k_m")]}


def test_planner_cpu_device_matches_llama_cpp(ggufs):
    """The planner's CPU-only prediction (weights + KV + compute on the one device) vs llama.cpp."""
    path = ggufs[("air", "q4_k_m")]
    fp = footprint_from_gguf(path)
    machine = Hardware(gpus=(), ram_total=16 * GIB, ram_available=16 * GIB, cores=2, cpu_bandwidth=20e9)
    p = plan(fp, machine, ctx=8192, n_ubatch=512)
    (cpu,) = p.devices
    got = load_and_measure(path, p.n_ctx, p.n_ubatch)
    assert close(cpu.weights, got["CPU_Mapped model"])
    assert close(cpu.kv, got["CPU KV"])
    assert close(cpu.compute, got["CPU compute"] + got["CPU output"])


def test_llama_cpp_applies_the_planned_expert_overrides(ggufs):
    """The -ot patterns the planner writes, given to llama.cpp (std::regex, first match wins) through the
    engine: exactly the expert tensors the plan keeps in RAM are logged as "buffer type overridden".
    The GPU is hypothetical (this build is CPU-only), sized so one MoE layer's experts fit whole and
    another's only in part: the partial-layer pattern is exercised too."""
    from glmlocal.engine.engine import Engine
    from glmlocal.plan.hardware import GPU

    path = ggufs[("tiny", "q4_k_m")]
    fp = footprint_from_gguf(path)
    chosen = None
    for free in range(1 * 2**20, 64 * 2**20, 16 * 1024):
        machine = Hardware(gpus=(GPU(0, "hypothetical", free, free, 100e9),), ram_total=16 * GIB,
                           ram_available=16 * GIB, cores=2, cpu_bandwidth=20e9)
        p = plan(fp, machine, ctx=512, margin=0, n_ubatch=512, mtp=False)  # trunk experts only
        if len(p.tensor_overrides) == 2:  # one whole-layer pattern plus one partial-layer pattern
            chosen = p
            break
    assert chosen is not None, "no GPU size gives a whole + a partial expert layer"
    expected = {n for layer in fp.trunk for n, _ in layer.expert_tensors
                if any(re.search(pat, n) for pat, _ in chosen.tensor_overrides)}
    all_experts = {n for layer in fp.trunk for n, _ in layer.expert_tensors}
    assert 0 < len(expected) < len(all_experts)  # some experts stay in RAM, not all
    engine = Engine.load(path, chosen)
    try:
        overridden = engine.report.overridden
    finally:
        engine.close()
    # "CPU" resolves to the best CPU buffer type per tensor (CPU_REPACK for Q4_K on this CPU).
    assert set(overridden) == expected and all(v.startswith("CPU") for v in overridden.values())
