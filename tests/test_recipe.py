"""quantize.recipe: llama.cpp's per-tensor type rules, checked against llama.cpp's own snapshot of the
GLM-4.6V (= GLM-4.5-Air shapes) type mixture and against the documented rule tables."""

from __future__ import annotations

import pytest

from quantize.ggml import GGMLType as T
from quantize.recipe import (
    RecipeContext,
    allows_quantization,
    category,
    fallback,
    plan_types,
    source_type,
    tensor_type,
    use_more_bits,
)
from tests.llamacpp_src import llamacpp_source


def glm_tensors(n_layer: int, n_nextn: int, n_embd: int, n_ff: int, n_ff_exp: int, n_expert: int,
                n_vocab: int = 151552, n_head: int = 96, n_kv: int = 8, head_dim: int = 128, dense: int = 1):
    """(name, ggml shape) of a glm4moe GGUF with these hyperparameters (MTP block last)."""
    out = [("token_embd.weight", (n_embd, n_vocab)), ("output.weight", (n_embd, n_vocab)),
           ("output_norm.weight", (n_embd,))]
    for i in range(n_layer + n_nextn):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (n_embd,)), (b + "post_attention_norm.weight", (n_embd,)),
                (b + "attn_q.weight", (n_embd, n_head * head_dim)), (b + "attn_q.bias", (n_head * head_dim,)),
                (b + "attn_k.weight", (n_embd, n_kv * head_dim)), (b + "attn_v.weight", (n_embd, n_kv * head_dim)),
                (b + "attn_output.weight", (n_head * head_dim, n_embd))]
        if i < dense:
            out += [(b + "ffn_gate.weight", (n_embd, n_ff)), (b + "ffn_up.weight", (n_embd, n_ff)),
                    (b + "ffn_down.weight", (n_ff, n_embd))]
        else:
            out += [(b + "ffn_gate_inp.weight", (n_embd, n_expert)), (b + "exp_probs_b.bias", (n_expert,)),
                    (b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert)),
                    (b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert)),
                    (b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert)),
                    (b + "ffn_gate_shexp.weight", (n_embd, n_ff_exp)), (b + "ffn_up_shexp.weight", (n_embd, n_ff_exp)),
                    (b + "ffn_down_shexp.weight", (n_ff_exp, n_embd))]
        if i >= n_layer:
            out += [(b + "nextn.eh_proj.weight", (2 * n_embd, n_embd)), (b + "nextn.enorm.weight", (n_embd,)),
                    (b + "nextn.hnorm.weight", (n_embd,)), (b + "nextn.shared_head_norm.weight", (n_embd,))]
    return out


def parse_snapshot(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """llama.cpp tests/snapshots/*.schema: `[FTYPE] default` then `tensor type` exceptions."""
    sections: dict[str, tuple[str, dict[str, str]]] = {}
    cur = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name, default = line[1:].split("]")
            cur = sections[name] = (default.strip(), {})
        else:
            tensor, typ = line.split()
            cur[1][tensor] = typ
    return sections


@pytest.mark.parametrize("ftype,section", [("q4_k_m", "Q4_K_M"), ("q6_k", "Q6_K"), ("q8_0", "Q8_0")])
def test_matches_llamacpp_snapshot_glm46v(ftype, section):
    """Every quantizable tensor of a GLM-4.6V/Air-shaped file gets the type llama.cpp's snapshot lists."""
    snap = parse_snapshot((llamacpp_source() / "tests/snapshots/glm-4.6v.schema").read_text())
    default, exceptions = snap[section]
    tensors = glm_tensors(46, 0, 4096, 10944, 1408, 128)
    types = plan_types(tensors, ftype, n_layer_all=46, n_expert=128)
    checked = 0
    for name, shape in tensors:
        if not allows_quantization(name, len(shape)):
            assert types[name] == source_type(name, len(shape))
            continue
        assert types[name].name.lower() == exceptions.get(name, default).lower(), name
        checked += 1
    assert checked > 46 * 5
    assert set(exceptions) <= {n for n, _ in tensors}


def test_use_more_bits_layer_sets():
    """The layer sets the MTP block shifts (reference doc §3.2)."""
    assert [i for i in range(46) if use_more_bits(i, 46)] == [0, 1, 2, 3, 4, *range(7, 38, 3), *range(40, 46)]
    assert [i for i in range(47) if use_more_bits(i, 47)] == [0, 1, 2, 3, 4, *range(7, 41, 3), *range(41, 47)]
    assert [i for i in range(93) if use_more_bits(i, 93)] == [*range(0, 11), *range(13, 80, 3), *range(81, 93)]
    assert sum(use_more_bits(i, 92) for i in range(92)) == 46


def test_glm46_q4_k_m_with_mtp_counts_the_nextn_block():
    """355B: n_layer_all = 93 with MTP, so ffn_down gets Q6_K on 81..92 (not 80); nextn head default Q4_K."""
    tensors = glm_tensors(92, 1, 5120, 12288, 1536, 160)
    types = plan_types(tensors, "q4_k_m", n_layer_all=93, n_expert=160)
    assert types["blk.80.ffn_down_exps.weight"] == T.Q4_K
    assert types["blk.81.ffn_down_exps.weight"] == T.Q6_K
    assert types["blk.92.ffn_down_exps.weight"] == T.Q6_K
    assert types["blk.92.nextn.eh_proj.weight"] == T.Q4_K
    assert types["blk.92.attn_v.weight"] == T.Q6_K
    assert types["blk.5.attn_k.weight"] == T.Q4_K  # n_expert != 8: no Mixtral bump
    assert types["blk.5.attn_output.weight"] == T.Q4_K
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.3.ffn_gate_inp.weight"] == T.F32 and types["blk.3.exp_probs_b.bias"] == T.F32
    no_mtp = plan_types(glm_tensors(92, 0, 5120, 12288, 1536, 160), "q4_k_m", n_layer_all=92, n_expert=160)
    assert no_mtp["blk.80.ffn_down_exps.weight"] == T.Q6_K


def test_eight_expert_rules_fire_only_for_eight_experts():
    tensors = glm_tensors(3, 1, 256, 512, 256, 8, n_vocab=1152, n_head=4, n_kv=2, head_dim=64)
    for ftype in ("q4_k_m", "q6_k", "q8_0"):
        types = plan_types(tensors, ftype, n_layer_all=4, n_expert=8)
        assert types["blk.1.attn_k.weight"] == T.Q8_0 and types["blk.2.attn_v.weight"] == T.Q8_0
    assert plan_types(tensors, "q4_k_m", 4, 8)["blk.1.attn_output.weight"] == T.Q5_K
    assert plan_types(tensors, "q6_k", 4, 8)["blk.1.attn_output.weight"] == T.Q6_K


@pytest.mark.parametrize("ne0,target,expected", [
    (512, T.Q4_K, T.Q4_K), (352, T.Q4_K, T.Q5_0), (352, T.Q6_K, T.Q8_0), (160, T.Q5_K, T.Q5_1),
    (48, T.Q4_K, T.F16), (40, T.Q8_0, T.F16), (64, T.Q8_0, T.Q8_0)])
def test_fallback(ne0, target, expected):
    assert fallback(ne0, target) == expected


def test_categories_and_never_quantized():
    assert category("blk.1.ffn_up_shexp.weight") == "ffn_up"
    assert category("blk.1.ffn_gate_inp.weight") == "ffn_gate"  # category only; never quantized
    assert category("blk.3.nextn.shared_head_head.weight") == "other"
    assert category("output.weight") == "output" and category("output_norm.weight") == "other"
    for name, nd in (("blk.0.attn_norm.weight", 1), ("blk.0.attn_q_norm.weight", 1), ("blk.1.exp_probs_b.bias", 1),
                     ("blk.1.ffn_gate_inp.weight", 2), ("blk.0.attn_q.bias", 1)):
        assert not allows_quantization(name, nd)
    ctx = RecipeContext(n_layer_all=4, n_expert=160, n_attention_wv=4)
    assert tensor_type("blk.1.ffn_gate_inp.weight", (256, 8), "q4_k_m", ctx) == T.F32
    assert tensor_type("token_embd.weight", (256, 1000), "bf16", ctx) == T.BF16
