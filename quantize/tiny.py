"""A tiny random glm4moe GGUF, written with numpy + our own writer and ggml quantizer (no torch).

`glmlocal doctor` evaluates it to prove the installed llama.cpp runs quantized MoE weights: a build that
crashes on Q4_K (e.g. a -march=native wheel on an AMX machine) is caught there, not at the first chat.
The layout is GLM-4.x's (one dense leading layer, then a MoE layer with a shared expert, router bias,
q/k/v biases) at a size that loads in milliseconds. The vocabulary is byte-level BPE with GLM's special
tokens and end-of-generation set (<|endoftext|>, <|user|>, <|observation|>).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from quantize.ggml import GGMLType, Quantizer
from quantize.recipe import plan_types
from quantize.writer import GGUFWriter

# FFN widths are not multiples of 256 (as in GLM-4.5-Air), so Q4_K_M falls back to Q5_0 / Q8_0 for ffn_down*:
# the smoke test then runs the K-quant, the legacy-quant and the llamafile sgemm kernels.
HP = dict(n_embd=256, n_head=2, n_head_kv=1, head_dim=128, n_ff=352, n_ff_exp=160, n_expert=4,
          n_expert_used=2, n_layer=2, n_dense=1, n_ctx=4096)
SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
           "<|assistant|>", "<|observation|>"]
USER_DEFINED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>", "/nothink"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n"), ("r", "e")]


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode mapping, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra, out = 0, {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocab() -> tuple[list[str], list[int]]:
    """(tokens, token types): bytes, merges, then GLM's special tokens (CONTROL) and markup (USER_DEFINED)."""
    tokens = _byte_chars() + [a + b for a, b in MERGES]
    types = [1] * len(tokens)
    tokens += SPECIAL + USER_DEFINED
    types += [3] * len(SPECIAL) + [4] * len(USER_DEFINED)
    return tokens, types


def _shapes(n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    h = HP
    e, q, kv = h["n_embd"], h["n_head"] * h["head_dim"], h["n_head_kv"] * h["head_dim"]
    out = [("token_embd.weight", (e, n_vocab)), ("output_norm.weight", (e,)), ("output.weight", (e, n_vocab))]
    for i in range(h["n_layer"]):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (e,)), (p + "attn_q.weight", (e, q)), (p + "attn_q.bias", (q,)),
                (p + "attn_k.weight", (e, kv)), (p + "attn_k.bias", (kv,)), (p + "attn_v.weight", (e, kv)),
                (p + "attn_v.bias", (kv,)), (p + "attn_output.weight", (q, e)),
                (p + "post_attention_norm.weight", (e,))]
        if i < h["n_dense"]:
            f = h["n_ff"]
            out += [(p + "ffn_gate.weight", (e, f)), (p + "ffn_up.weight", (e, f)), (p + "ffn_down.weight", (f, e))]
        else:
            f, n = h["n_ff_exp"], h["n_expert"]
            out += [(p + "ffn_gate_inp.weight", (e, n)), (p + "exp_probs_b.bias", (n,)),
                    (p + "ffn_gate_exps.weight", (e, f, n)), (p + "ffn_up_exps.weight", (e, f, n)),
                    (p + "ffn_down_exps.weight", (f, e, n)), (p + "ffn_gate_shexp.weight", (e, f)),
                    (p + "ffn_up_shexp.weight", (e, f)), (p + "ffn_down_shexp.weight", (f, e))]
    return out


def _metadata(w: GGUFWriter, tokens: list[str], types: list[int]) -> None:
    h, a = HP, "glm4moe."
    w.add_string("general.architecture", "glm4moe")
    w.add_string("general.name", "glmlocal doctor tiny random")
    w.add_u32("general.file_type", 15)
    w.add_u32("general.quantization_version", 2)
    for key, val in [("block_count", h["n_layer"]), ("context_length", h["n_ctx"]), ("embedding_length", h["n_embd"]),
                     ("feed_forward_length", h["n_ff"]), ("attention.head_count", h["n_head"]),
                     ("attention.head_count_kv", h["n_head_kv"]), ("attention.key_length", h["head_dim"]),
                     ("attention.value_length", h["head_dim"]), ("rope.dimension_count", h["head_dim"] // 2),
                     ("expert_count", h["n_expert"]), ("expert_used_count", h["n_expert_used"]),
                     ("expert_shared_count", 1), ("expert_feed_forward_length", h["n_ff_exp"]),
                     ("leading_dense_block_count", h["n_dense"]), ("expert_group_count", 1),
                     ("expert_group_used_count", 1), ("expert_gating_func", 2)]:
        w.add_u32(a + key, val)
    w.add_f32(a + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add_f32(a + "rope.freq_base", 1e6)
    w.add_f32(a + "expert_weights_scale", 1.0)
    w.add_bool(a + "expert_weights_norm", True)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "glm4")
    w.add_array("tokenizer.ggml.tokens", GGUFValueType.STRING, tokens)
    w.add_array("tokenizer.ggml.token_type", GGUFValueType.INT32, types)
    w.add_array("tokenizer.ggml.merges", GGUFValueType.STRING, [f"{a} {b}" for a, b in MERGES])
    ids = {t: i for i, t in enumerate(tokens)}
    for key, tok in [("bos", "[gMASK]"), ("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("eom", "<|observation|>"),
                     ("unknown", "<|endoftext|>"), ("padding", "<|endoftext|>")]:
        w.add_u32(f"tokenizer.ggml.{key}_token_id", ids[tok])
    w.add_bool("tokenizer.ggml.add_bos_token", False)


def _data(name: str, shape: tuple[int, ...], gtype: GGMLType, rng: np.random.Generator, q: Quantizer) -> np.ndarray:
    if name.endswith("norm.weight"):
        x = np.ones(shape[::-1], dtype=np.float32)
    else:
        x = (rng.standard_normal(shape[::-1]) * 0.05).astype(np.float32)
    if gtype == GGMLType.F32:
        return x
    if gtype == GGMLType.F16:
        return x.astype(np.float16)
    if gtype == GGMLType.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return q.quantize(gtype, x.reshape(-1, shape[0]))


def write_tiny_gguf(path: str | Path, *, quant: str = "q4_k_m", seed: int = 0) -> Path:
    """Write the tiny random model to `path` (via `.part` + rename) and return the path."""
    tokens, types = vocab()
    shapes = _shapes(len(tokens))
    plan = plan_types(shapes, quant, HP["n_layer"], HP["n_expert"])
    w = GGUFWriter(path)
    _metadata(w, tokens, types)
    for name, shape in shapes:
        w.add_tensor_info(name, shape, plan[name])
    rng = np.random.default_rng(seed)
    with Quantizer(threads=1) as q, w:
        for name, shape in shapes:
            w.write_tensor_data(name, _data(name, shape, plan[name], rng, q))
    return Path(path)
