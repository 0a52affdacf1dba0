"""Planner: what MTP costs and is expected to gain, the ubatch for prompt speed, the parallel sequences of the
shared KV pool. Tables with the arithmetic written out (hardware as in test_planner.py: 936 GB/s GPUs given by
size, dual-channel DDR5 89.6 GB/s, 16 cores)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from glmlocal.errors import InputError
from glmlocal.models.registry import get_model
from glmlocal.plan.estimate import draft_works, works
from glmlocal.plan.footprint import footprint_from_gguf, footprint_from_spec
from glmlocal.plan.hardware import GIB, Hardware, probe
from glmlocal.plan.layout import Budget, layout
from glmlocal.plan.mtp import mtp_cost
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.planner import default_parallel, plan, plan_gguf
from glmlocal.plan.speed import (
    decode_seconds,
    hit_fraction,
    prompt_seconds,
    ubatch_seconds,
)

AIR = footprint_from_spec(get_model("glm-4.5-air"), "q4_k_m")


def hw(gpu_mem: str | None, ram: str):
    return probe(PlanOptions(gpu_mem=gpu_mem, ram=ram, cpu_only=gpu_mem is None, threads=16, gpu_bw=936,
                             cpu_bw=89.6))


def test_what_mtp_costs_for_air():
    """GLM-4.5-Air's NextN block (blk.46, GLM-4.5 layout: its own shared head and token embedding):
    attention 62,513,152 + shared expert 12,615,680 + router 2,097,664 + eh_proj/norms/head 368,099,328
    = 445,325,824 B beside the last layer; its embedding 349,175,808 B stays in RAM; routed experts 1,614,807,040 B.
    KV: one layer, 2 (K, V) x 8 heads x 128 x 2 B = 4,096 B per token x 65,536 = 268,435,456 B.
    Compute: graph_mtp replayed at ubatch 512 with 8 rows of logits (n_outputs_max = 8 sequences): 165,687,328 B.
    RAM-side: embeddings 2 x 4096 x 4 x 512 + logits rows 151,552 x 4 x 8 + NextN rows 4096 x 4 x (544 + 512)
    = 16,777,216 + 4,849,664 + 17,301,504 = 38,928,384 B."""
    c = mtp_cost(AIR, 65536, n_ubatch=512, n_batch=512, n_seq=8, type_k="f16", type_v="f16")
    assert (c.weights, c.embd, c.experts, c.kv, c.compute, c.host) == (
        445_325_824, 349_175_808, 1_614_807_040, 268_435_456, 165_687_328, 38_928_384)
    assert c.weights + c.embd + c.experts == AIR.mtp_weights_bytes == 2_409_308_672  # 1/29 of the trunk's weights
    assert mtp_cost(footprint_from_spec(get_model("glm-4.5-air"), "q4_k_m", mtp=False), 65536, n_ubatch=512,
                    n_batch=512, n_seq=1, type_k="f16", type_v="f16") is None


def test_mtp_on_a_96_gib_gpu_and_its_expected_gain():
    """Air all on one 96 GiB card: MTP fits beside layer 45 with room to spare, experts included.
    CUDA0's MTP share: 445,325,824 + 1,614,807,040 + 268,435,456 + 165,687,328 = 2,494,255,648 B; RAM's: the
    NextN embedding + hand-over buffers = 349,175,808 + 38,928,384 = 388,104,192 B. The trunk's figures do not move.
    Expected gain (speedup(k) = (1 + k a_k) t(1) / (t(1 + k) + k t_draft), per device bytes / (936e9 x 0.75)):
      t(1) reads non-expert 4,067,138,048 + experts 66,022,539,264 x 8/128 + KV 188,416 x 4096 = 8,965,298,688 B
      t(2) reads the experts two tokens hit: 1 - (120/128)^2 = 0.12109375 of them: 12,833,806,848 B (1.4315 x)
      t_draft reads the NextN block 445,325,824 + its experts 1,614,807,040 x 8/128 + KV 4096 x 4096: 563,028,480 B
      k = 1: (1 + 0.92) / (1.4315 + 0.0628) = 1.285;  k = 2: 2.55 / 1.962 = 1.300;  k = 3: 2.845 / 2.404 = 1.184
    (llama.cpp measured 1.17-1.20x with one draft on 4 x RTX 3090, PR #26534.)"""
    p = plan(AIR, hw("96GiB", "64GiB"))
    gpu, cpu = p.devices
    assert p.mtp and p.mtp_draft == 2 and gpu.mtp == 2_494_255_648 and cpu.mtp == 388_104_192
    assert (gpu.weights, gpu.kv) == (AIR.weights_bytes - AIR.token_embd, 188_416 * 65536)
    assert [(e.n_draft, e.speedup) for e in p.mtp_estimates] == [(1, 1.285), (2, 1.3), (3, 1.184)]
    assert p.mtp_estimates[1].tokens_per_s == pytest.approx(p.est_tokens_per_s * 1.3, abs=0.01)
    assert p.tensor_overrides == [(r"blk\.46\.nextn\.embed_tokens", "CPU")]
    assert p.llama_cpp_flags().endswith("--spec-type draft-mtp --spec-draft-n-max 2")
    b = Budget(AIR, hw("96GiB", "64GiB"), "f16", "f16", 512, GIB, 2 * GIB, mtp=True, n_seq=8)
    lay = layout(b, 65536, 0)
    trunk, draft = works(b, lay), draft_works(b, lay)
    assert trunk[0].shared == 4_067_138_048 and trunk[0].experts == 66_022_539_264
    bw = 936e9 * 0.75
    assert decode_seconds(trunk, AIR, 1) == pytest.approx(8_965_298_688 / bw)
    assert decode_seconds(trunk, AIR, 2) == pytest.approx(12_833_806_848 / bw)
    assert decode_seconds(draft, AIR, 1) == pytest.approx(563_028_480 / bw)
    assert hit_fraction(AIR, 2) == 0.12109375


def test_mtp_is_off_where_verification_pays_for_experts_in_ram():
    """Air on 24 GiB + 64 GiB: the GPU is full, so MTP's 2.1 GiB would come out of routed experts, and with 42
    layers' experts in RAM verifying 2 tokens reads 1.94 x the expert bytes from RAM: 1.02x at best, under the
    1.05x MTP must promise. Asked for (--spec mtp: mtp=True) it is planned anyway: its experts stay in RAM (-ot)."""
    p = plan(AIR, hw("24GiB", "64GiB"))
    assert not p.mtp and p.mtp_estimates == () and all(d.mtp == 0 for d in p.devices)
    assert any(n.startswith("MTP off: expected 13.1 tok/s with it vs 13.1 without, less than 1.05x") for n in p.notes)
    forced = plan(AIR, hw("24GiB", "64GiB"), mtp=True)
    assert forced.mtp and forced.mtp_draft == 1 and forced.mtp_estimates[0].speedup == pytest.approx(1.017, abs=0.01)
    assert forced.tensor_overrides[-1] == (r"blk\.46\.ffn_(up|down|gate)_exps", "CPU")
    assert forced.est_tokens_per_s < p.est_tokens_per_s  # the experts it displaced
    assert not plan(AIR, hw("96GiB", "64GiB"), mtp=False).mtp


def test_mtp_never_costs_context():
    """GLM-4.6 on 24 GiB + 256 GiB: the automatic context already shrank to 36096 to keep attention and KV on
    the card, so MTP's NextN weights + KV + compute do not fit beside layer 91: off, context kept."""
    f = footprint_from_spec(get_model("glm-4.6"), "q4_k_m")
    for mtp in (None, True):
        p = plan(f, hw("24GiB", "256GiB"), mtp=mtp)
        assert not p.mtp and p.n_ctx == 36096
        assert any(n.startswith("MTP off: its NextN weights, KV and compute buffer do not fit") for n in p.notes)


def test_a_gguf_without_nextn_tensors_plans_without_mtp():
    """A trunk-only GGUF keeps nextn_predict_layers = 1 but has no blk.N.nextn.* tensors: MTP off, said why; a
    `convert --no-mtp` one has no NextN layer at all: nothing to say."""
    nextn = AIR.layers[46]
    trunk_only = replace(AIR, layers=(*AIR.layers[:46], replace(nextn, nextn=0, nextn_embd=0)))
    p = plan(trunk_only, hw("96GiB", "64GiB"))
    assert not p.mtp and "MTP off: this GGUF has no NextN block (converted with --no-mtp, or trunk-only)" in p.notes
    no_mtp = plan(footprint_from_spec(get_model("glm-4.5-air"), "q4_k_m", mtp=False), hw("96GiB", "64GiB"))
    assert not no_mtp.mtp and not any("MTP" in n for n in no_mtp.notes)


def test_ubatch_amortises_the_expert_upload():
    """Air on 24 GiB + 64 GiB: 59-62 GB of experts stay in RAM. For a prompt ubatch of T >= 32 tokens llama.cpp
    runs their matmuls on CUDA0 after copying the experts the T tokens use (all of them past ~100 tokens: 1 -
    (120/128)^T) over PCIe (25 GB/s), then computes (weights 0.2 x 71 TFLOP/s, attention 0.4 x 71):
      T = 512:  2.36 s upload + 0.89 s compute per ubatch (the first: context 256) -> 20K prompt 144 s
      T = 2048: 2.41 s + 3.85 s, a quarter as many ubatches               ->  74 s, decode 12.91 tok/s
      T = 4096: 2.47 s + 8.36 s                                           ->  63 s, but its 4.1 GB compute
                buffer pushes another layer's experts to RAM: decode 12.63 < 0.97 x 13.13
    so the plan takes 2048 (n_batch = n_ubatch: the batch loop spends at most one ubatch per step)."""
    p = plan(AIR, hw("24GiB", "64GiB"))
    assert (p.n_ubatch, p.n_batch) == (2048, 2048) and "-b 2048 -ub 2048" in p.llama_cpp_flags()
    assert p.est_ttft_s == pytest.approx(74.3, abs=0.1) and p.est_prompt_tokens_per_s == pytest.approx(269.0, abs=0.1)
    by_ub = {ub: plan(AIR, hw("24GiB", "64GiB"), n_ubatch=ub, mtp=False) for ub in (512, 2048, 4096)}
    assert [round(by_ub[ub].est_ttft_s) for ub in (512, 2048, 4096)] == [144, 74, 63]
    assert by_ub[4096].est_tokens_per_s < 0.97 * by_ub[512].est_tokens_per_s <= by_ub[2048].est_tokens_per_s
    b = Budget(AIR, hw("24GiB", "64GiB"), "f16", "f16", 512, GIB, 2 * GIB, n_seq=8, n_batch=512)
    w = works(b, layout(b, 65536, 0))
    upload = w[-1].experts * hit_fraction(AIR, 512) / 25e9
    compute = 512 * (w[0].flops_tok + w[-1].flops_tok) / (0.2 * 71e12) + 512 * 256 * w[0].attn_flops / (0.4 * 71e12)
    assert ubatch_seconds(w, AIR, b.hw, 512, 256, 0) == pytest.approx(upload + compute)
    assert upload == pytest.approx(2.36, abs=0.01) and compute == pytest.approx(0.89, abs=0.01)


def test_ubatch_hint_when_only_less_context_makes_room():
    """GLM-4.6 on 24 GiB: attention + KV fill the card at 36096 tokens, so a bigger ubatch would cost context; the
    plan keeps 512 (189 GB of experts uploaded per 512 tokens: 445 s for 20K) and says what trading helps."""
    p = plan(footprint_from_spec(get_model("glm-4.6"), "q4_k_m"), hw("24GiB", "256GiB"))
    assert p.n_ubatch == 512 and p.n_ctx == 36096 and p.est_ttft_s == pytest.approx(444.8, abs=0.1)
    hint = next(n for n in p.notes if n.startswith("--ubatch"))
    assert hint.startswith("--ubatch 4096 --ctx 29696 would process a 20K-token prompt in ~")


def test_cpu_prompt_speed_is_calibrated_and_ubatch_stays(gguf_factory):
    """On a CPU the prompt is compute-bound at any ubatch, so the plan keeps 512. The rate is calibrated on this
    project's 2-core CPU: bench/ubatch.py, 512-token prompt, 1816 tok/s on bench1g Q4_K_M (107.0 MFLOP of weights
    per token + attention 4 x 8 heads x 128 x 5 layers x 256 = 5.2 MFLOP at the ubatch's mean context: 112.2 MFLOP
    x 1816 / 2 cores = 102 GFLOP/s per core; CPU_FLOPS_PER_CORE = 110e9 gives 2 x 110e9 / 112.2e6 = 1961 tok/s)."""
    fp = footprint_from_gguf(gguf_factory("bench1g", "q4_k_m"))
    two_cores = Hardware(gpus=(), ram_total=16 * GIB, ram_available=16 * GIB, cores=2, cpu_bandwidth=20e9)
    b = Budget(fp, two_cores, "f16", "f16", 512, GIB, 2 * GIB)
    w = works(b, layout(b, 4096, 0))
    assert w[0].flops_tok == pytest.approx(106.95e6, rel=0.001)
    rates = [512 / prompt_seconds(w, fp, two_cores, 512, ub, None) for ub in (256, 512, 2048)]
    assert all(r == pytest.approx(1961, abs=30) for r in rates)
    assert plan(AIR, hw(None, "128GiB")).n_ubatch == 512


@pytest.mark.parametrize("n_ctx,parallel", [(2048, 1), (8192, 1), (16384, 2), (36096, 4), (65536, 8), (131072, 8)])
def test_default_parallel_counts_8k_conversations_in_the_pool(n_ctx, parallel):
    """One shared KV pool of n_ctx tokens (kv_unified): serve's default --parallel is how many 8K conversations it
    holds, 1..8; the plan is sized for that many sequences (a row of logits each in the output buffers)."""
    p = plan(AIR, hw(None, "256GiB"), ctx=n_ctx, n_ubatch=512)
    assert default_parallel(p) == p.parallel == parallel
    note = next(n for n in p.notes if n.startswith("KV pool of"))
    assert f"serve --parallel defaults to {parallel}" in note
    assert note.endswith(f"{parallel} conversations of {n_ctx // parallel} tokens each fit)" if parallel > 1
                         else f"one conversation of {n_ctx} tokens fits)")
    one = plan(AIR, hw(None, "256GiB"), ctx=n_ctx, n_ubatch=512, n_seq=1, mtp=False)
    many = plan(AIR, hw(None, "256GiB"), ctx=n_ctx, n_ubatch=512, n_seq=parallel, mtp=False)
    assert many.devices[0].compute - one.devices[0].compute == (parallel - 1) * 151552 * 4


def test_options_reach_the_plan(gguf_factory):
    """PlanOptions (the CLI's --ubatch, --spec's MTP choice, serve's --parallel) reach plan() through plan_gguf."""
    path = gguf_factory("tiny45", "q4_k_m")
    machine = Hardware(gpus=(), ram_total=16 * GIB, ram_available=16 * GIB, cores=2, cpu_bandwidth=20e9)
    p = plan_gguf(path, PlanOptions(ctx=4096, ubatch=256, mtp=True, parallel=3), machine)
    assert (p.n_ubatch, p.n_batch, p.mtp, p.parallel) == (256, 256, True, 3)
    assert not plan_gguf(path, PlanOptions(ctx=4096, mtp=False), machine).mtp
    with pytest.raises(InputError, match="ubatch must be positive"):
        plan_gguf(path, PlanOptions(ctx=4096, ubatch=0), machine)


def test_plan_shows_mtp_prompt_speed_and_takes_ubatch(tmp_path, monkeypatch):
    """`glmlocal plan` prints MTP's row and expected gain and the prompt estimate next to the decode one; --json
    carries them; --ubatch fixes the ubatch (and n_batch)."""
    import json

    from typer.testing import CliRunner

    from glmlocal.cli.app import app

    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "store"))
    base = ["plan", "glm-4.5-air", "--gpu-mem", "96GiB", "--ram", "64GiB", "--gpu-bw", "936", "--cpu-bw", "89.6",
            "--threads", "16"]
    text = CliRunner().invoke(app, base, catch_exceptions=False).stdout
    assert "estimated decode speed 78.3 tokens/s; MTP on: 2 drafts per step, ~101.8 tok/s expected (1.30x)" in text
    assert "prompt ~389 tok/s at ubatch 512, a 20K-token prompt in ~51 s" in text
    assert "MTP (NextN, its KV, buffers) GiB" in text and "--spec-type draft-mtp --spec-draft-n-max 2" in text
    doc = json.loads(CliRunner().invoke(app, [*base, "--ubatch", "1024", "--json"], catch_exceptions=False).stdout)
    p = doc["placement"]
    assert (p["n_ubatch"], p["n_batch"], p["mtp"], p["parallel"]) == (1024, 1024, True, 8)
    assert [e["n_draft"] for e in p["mtp_estimates"]] == [1, 2, 3] and p["prompt_ref"] == 20000
    assert p["est_ttft_s"] > 0 and [d["mtp"] > 0 for d in p["devices"]] == [True, True]
