"""The random GLM checkpoints every other test builds on: layout, loadability, tokenizer, FP8 twins."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.fixtures import fp8 as fp8mod
from tests.fixtures.checkpoint import (
    EOS_TOKENS,
    PRESETS,
    TEMPLATES,
    build_checkpoint,
    get_preset,
    hf_config,
    load_index,
    tensor_specs,
)
from tests.fixtures.reference import hf_logits, hf_tokenizer
from tests.fixtures.tokenizer import GLM_ADDED_TOKENS, N_SPECIAL_FLAGGED

torch.set_num_threads(2)

VARIED_TEXTS = [
    "Hello, world! It's a test; we'll see.",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストと한국어 텍스트",
    "emoji 😀🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ❤️",
    "   many   spaces\t\ttabs\n\n\nnewlines\r\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    ("<|user|>\nhi<|assistant|>\n<think>reason</think>answer<tool_call>f\n<arg_key>a</arg_key>"
     "\n<arg_value>1</arg_value>\n</tool_call><|observation|>"),
    "[gMASK]<sop><|system|>\nsys/nothink",
]


def tensors_of(ckpt: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (shard, shape, dtype) read from the shard headers."""
    out = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                out[name] = (shard.name, tuple(sl.get_shape()), sl.get_dtype())
    return out


def read_tensor(ckpt: Path, name: str) -> torch.Tensor:
    shard = load_index(ckpt)["weight_map"][name]
    with safe_open(str(ckpt / shard), "pt") as f:
        return f.get_tensor(name)


# ------------------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("name", ["tiny", "tiny45", "air"])
def test_layout_matches_published(ckpt_factory, name):
    ckpt, p = ckpt_factory(name), get_preset(name)
    index = load_index(ckpt)
    on_disk = tensors_of(ckpt)
    shards = sorted(ckpt.glob("*.safetensors"))
    n = p.n_shards
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(on_disk)
    assert all(index["weight_map"][n] == on_disk[n][0] for n in on_disk)
    nbytes = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    assert index["metadata"]["total_size"] == sum(np.prod(s) * nbytes[d] for _, s, d in on_disk.values())

    m, e_count = p.num_hidden_layers, p.n_routed_experts
    ffn, hidden = p.moe_intermediate_size, p.hidden_size
    for layer in range(p.first_k_dense_replace, m + 1):  # MoE trunk layers and the NextN layer
        for e in range(e_count):
            expert = f"model.layers.{layer}.mlp.experts.{e}"
            assert on_disk[f"{expert}.gate_proj.weight"][1] == on_disk[f"{expert}.up_proj.weight"][1] == (ffn, hidden)
            assert on_disk[f"{expert}.down_proj.weight"][1] == (hidden, ffn)
        assert on_disk[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][1:] == ((e_count,), "F32")
        assert on_disk[f"model.layers.{layer}.mlp.gate.weight"][2] == "BF16"
    assert not any(".experts.gate_up_proj" in n for n in on_disk)
    assert on_disk["model.layers.0.mlp.gate_proj.weight"][1] == (p.intermediate_size, p.hidden_size)

    nextn_names = ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight")
    nextn = {f"model.layers.{m}.{k}" for k in nextn_names}
    assert nextn <= set(on_disk)
    assert on_disk[f"model.layers.{m}.eh_proj.weight"][1] == (p.hidden_size, 2 * p.hidden_size)
    extras = {f"model.layers.{m}.shared_head.head.weight", f"model.layers.{m}.embed_tokens.weight"}
    assert (extras <= set(on_disk)) == p.mtp_head_and_embed
    assert not (extras & set(on_disk)) or p.mtp_head_and_embed
    assert f"model.layers.{m}.self_attn.o_proj.weight" in on_disk
    assert not any(n.startswith(f"model.layers.{m + 1}.") for n in on_disk)

    has_qk_norm = any(n.endswith("self_attn.q_norm.weight") for n in on_disk)
    assert has_qk_norm == p.use_qk_norm
    assert all(d == "BF16" for n, (_, _, d) in on_disk.items() if not n.endswith("e_score_correction_bias"))


def test_row_sizes_per_preset():
    """tiny: every 2-D row a multiple of 256 (K-quants apply); air: FFN rows only multiples of 32."""
    for name in ("tiny", "tiny45", "air"):
        p = get_preset(name)
        specs = tensor_specs(hf_config(p, 3072, [0, 1, 2]), p)
        rows = {s.name: s.shape[-1] for s in specs if len(s.shape) == 2}
        if name == "air":
            odd = {n for n, r in rows.items() if r % 256}
            assert odd and all(r % 32 == 0 for r in rows.values())
            assert all("down_proj" in n for n in odd)  # the FFN-input rows are the odd ones
        else:
            assert all(r % 256 == 0 for r in rows.values()), {n: r for n, r in rows.items() if r % 256}


@pytest.mark.parametrize("name,low,high", [("mid", 150e6, 300e6), ("bench1g", 0.9e9, 1.3e9)])
def test_larger_presets_have_their_advertised_size(name, low, high):
    p = get_preset(name)
    specs = tensor_specs(hf_config(p, 3072, [0, 1, 2]), p)
    assert low < sum(s.nbytes for s in specs) < high
    assert all(s.shape[-1] % 256 == 0 for s in specs if len(s.shape) == 2)


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_configs_and_template(ckpt_factory, family):
    ckpt = ckpt_factory("tiny", family=family)
    config = json.loads((ckpt / "config.json").read_text())
    gen = json.loads((ckpt / "generation_config.json").read_text())
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    vocab = json.loads((ckpt / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    eos = [ids[t] for t in EOS_TOKENS]
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["model_type"] == "glm4_moe"
    assert config["eos_token_id"] == eos and gen["eos_token_id"] == eos and config["pad_token_id"] == eos[0]
    assert config["num_nextn_predict_layers"] == 1 and config["partial_rotary_factor"] == 0.5
    assert config["torch_dtype"] == "bfloat16" and config["attention_bias"] is True
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] > max(ids.values()) + 1
    assert {"temperature", "top_p", "top_k"} <= set(gen)
    # zai-org layout: the template in chat_template.jinja, a model card with YAML front matter
    assert (ckpt / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATES[family].read_text(encoding="utf-8")
    assert "chat_template" not in tok_cfg
    assert hf_tokenizer(ckpt).chat_template == TEMPLATES[family].read_text(encoding="utf-8")
    card = (ckpt / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "license: mit" in card and "pipeline_tag: text-generation" in card
    assert f"# {'GLM-4.7' if family == 'glm47' else 'GLM-4.6'}\n" in card
    assert tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|endoftext|>"
    assert "quantization_config" not in config


def test_build_is_deterministic(tmp_path, tiny_ckpt):
    build_checkpoint(tmp_path / "again", "tiny")

    def digest(d: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.iterdir() if not f.name.startswith(".")}

    assert digest(tmp_path / "again") == digest(tiny_ckpt)


# ---------------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("name", ["tiny", "tiny45", "air"])
def test_transformers_loads_every_weight_exactly(ckpt_factory, name):
    from transformers import Glm4MoeForCausalLM

    ckpt, p = ckpt_factory(name), get_preset(name)
    model, info = Glm4MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp = re.compile(rf"model\.layers\.{p.num_hidden_layers}\.")
    assert info["unexpected_keys"] and all(mtp.match(k) for k in info["unexpected_keys"])
    for key, value in model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            base, kind = key.rsplit(".", 1)
            parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            expected = torch.stack([torch.cat([read_tensor(ckpt, f"{base}.{e}.{w}.weight") for w in parts])
                                    for e in range(p.n_routed_experts)])
        else:
            expected = read_tensor(ckpt, key)
        assert torch.equal(expected.float(), value.float()), key


@pytest.mark.parametrize("name", ["tiny", "air"])
def test_reference_logits_are_finite_and_informative(ckpt_factory, name):
    ckpt = ckpt_factory(name)
    ids = hf_tokenizer(ckpt).encode("[gMASK]<sop><|user|>\nHello 世界 😀 def f(): pass<|assistant|>")
    logits = hf_logits(ckpt, ids)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert logits.shape == (len(ids), vocab) and np.isfinite(logits).all()
    probs = torch.softmax(torch.from_numpy(logits), -1)
    assert (probs.max(-1).values > 5 / vocab).all()  # far from uniform
    assert (probs.max(-1).values < 0.99).all()  # but not collapsed
    assert len(set(logits.argmax(-1).tolist())) > 1  # depends on the input
    from transformers import Glm4MoeForCausalLM

    bf16 = Glm4MoeForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()  # no overflow in bf16 either
    with torch.no_grad():
        out = bf16(input_ids=torch.tensor([ids]), use_cache=False).logits.float()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["tiny", "air"])
def test_fixture_is_sensitive_to_glm_specifics(ckpt_factory, name):
    """Dropping a GLM detail (router bias, shared expert, partial RoPE) must move logits far beyond the
    converter's KL thresholds (5e-3 BF16, 2e-2 Q8_0), or those tests could not catch the bug."""
    from transformers import Glm4MoeForCausalLM

    ckpt = ckpt_factory(name)
    prompt = "[gMASK]<sop><|user|>\nHello 世界 def f(x): return x*2<|assistant|>"
    ids = torch.tensor([hf_tokenizer(ckpt).encode(prompt)])
    model = Glm4MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def logprobs():
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0], -1)

    base = logprobs()

    def kl_after(mutate) -> float:
        mutate()
        out = logprobs()
        return (base.exp() * (base - out)).sum(-1).mean().item()

    def zero(suffix):
        return lambda: [v.data.zero_() for k, v in model.named_parameters() if k.endswith(suffix)] + \
            [v.zero_() for k, v in model.named_buffers() if k.endswith(suffix)]

    def full_rope():
        model.config.rope_parameters["partial_rotary_factor"] = 1.0
        model.model.rotary_emb.__init__(model.config)

    assert kl_after(zero("e_score_correction_bias")) > 0.04
    assert kl_after(zero("shared_experts.down_proj.weight")) > 0.04
    assert kl_after(full_rope) > 0.04


# ------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_and_special_tokens(tiny_ckpt):
    tok = hf_tokenizer(tiny_ckpt)
    for text in VARIED_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    data = json.loads((tiny_ckpt / "tokenizer.json").read_text())
    n_normal = len(data["model"]["vocab"])
    added = data["added_tokens"]
    assert [t["content"] for t in added] == list(GLM_ADDED_TOKENS)
    assert [t["id"] for t in added] == list(range(n_normal, n_normal + len(GLM_ADDED_TOKENS)))
    assert [t["special"] for t in added] == [i < N_SPECIAL_FLAGGED for i in range(len(added))]
    for t in added:
        assert tok.encode(t["content"], add_special_tokens=False) == [t["id"]], t["content"]
        assert tok.encode(f"a{t['content']}b", add_special_tokens=False)[1] == t["id"]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert n_normal >= 2000  # "a few thousand" tokens, so merges are exercised
    pre = data["pre_tokenizer"]["pretokenizers"]
    assert pre[0]["type"] == "Split" and pre[1] == {**pre[1], "type": "ByteLevel", "use_regex": False}


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_chat_template_renders_with_hf_tokenizer(ckpt_factory, family):
    tok = hf_tokenizer(ckpt_factory("tiny", family=family))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # GLM-4.7 opens the reasoning block in the generation prompt; GLM-4.5/4.6 leave it to the model.
    suffix = {"glm45": "<|assistant|>", "glm47": "<|assistant|><think>"}[family]
    assert text.startswith("[gMASK]<sop><|user|>") and text.rstrip().endswith(suffix)
    assert tok.encode(text, add_special_tokens=False)[:3] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>", "<|user|>"])


# ------------------------------------------------------------------------------------------- FP8

@pytest.mark.parametrize("name,fmt", [("tiny", "block"), ("tiny", "compressed-tensors"), ("air", "block"),
                                      ("air", "compressed-tensors"), ("tiny45", "compressed-tensors")])
def test_fp8_layout_and_twin(ckpt_factory, fp8_twin_factory, name, fmt):
    fp8_ckpt, twin, plain = ckpt_factory(name, fp8=fmt), fp8_twin_factory(name, fmt), ckpt_factory(name)
    config = json.loads((fp8_ckpt / "config.json").read_text())
    assert fp8mod.fp8_format(config) == fmt
    on_disk = tensors_of(fp8_ckpt)
    plain_disk = tensors_of(plain)
    scale_suffix = "weight_scale_inv" if fmt == "block" else "weight_scale"
    for n, (_, shape, dtype) in plain_disk.items():
        if fp8mod.is_quantized(n, shape):
            assert on_disk[n][1:] == (shape, "F8_E4M3"), n
            scale = on_disk[n[: -len("weight")] + scale_suffix]
            assert scale[1:] == (fp8mod.scale_shape(shape, fmt), "F32" if fmt == "block" else "BF16")
        else:
            assert on_disk[n][1:] == (shape, dtype), n  # embeddings, heads, routers, norms untouched
    kept = {n for n in plain_disk if re.search(r"(embed_tokens|lm_head|mlp\.gate|norm|eh_proj)\.weight$", n)}
    assert kept and all(on_disk[n][2] in ("BF16", "F32") for n in kept)
    assert any("experts.0.down_proj" in n and on_disk[n][2] == "F8_E4M3" for n in on_disk)
    ignored = config["quantization_config"].get("ignore") or config["quantization_config"]["modules_to_not_convert"]
    assert "lm_head" in ignored
    assert all(n[: -len(".weight")] in ignored for n in kept if n.endswith(("gate.weight", "eh_proj.weight")))
    # The twin is the exact dequantization, shard for shard.
    assert tensors_of(twin).keys() == plain_disk.keys()
    assert "quantization_config" not in json.loads((twin / "config.json").read_text())
    for n in (f"model.layers.{get_preset(name).num_hidden_layers}.mlp.experts.3.down_proj.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"):
        q, s = read_tensor(fp8_ckpt, n), read_tensor(fp8_ckpt, n[: -len("weight")] + scale_suffix)
        deq = fp8mod.dequantize(q, s, fmt)
        assert torch.equal(read_tensor(twin, n), deq)
        original = read_tensor(plain, n).float()
        err = (deq.float() - original).abs().max() / original.abs().max()
        assert 0 < err < 0.08  # FP8 noise, not garbage
    assert torch.equal(read_tensor(twin, "lm_head.weight"), read_tensor(plain, "lm_head.weight"))


def test_fp8_twin_loads_and_tracks_bf16(ckpt_factory, fp8_twin_factory):
    twin, plain = fp8_twin_factory("tiny", "compressed-tensors"), ckpt_factory("tiny")
    ids = list(range(10, 40))
    a, b = hf_logits(twin, ids), hf_logits(plain, ids)
    assert np.isfinite(a).all()
    pa, pb = torch.log_softmax(torch.from_numpy(a), -1), torch.log_softmax(torch.from_numpy(b), -1)
    kl = (pb.exp() * (pb - pa)).sum(-1).mean().item()
    assert 0 < kl < 0.2
    with pytest.raises(ValueError, match="FP8"):
        hf_logits(ckpt_factory("tiny", fp8="compressed-tensors"), ids)


def test_unknown_preset_and_formats_rejected(tmp_path):
    with pytest.raises(KeyError, match="unknown fixture preset"):
        build_checkpoint(tmp_path, "huge")
    with pytest.raises(ValueError, match="fp8"):
        build_checkpoint(tmp_path, "tiny", fp8="int4")
    with pytest.raises(ValueError, match="family"):
        build_checkpoint(tmp_path, "tiny", family="glm3")
    assert set(PRESETS) >= {"tiny", "tiny45", "air", "bench1g"}


@pytest.mark.slow
def test_bench1g_builds(ckpt_factory):
    ckpt = ckpt_factory("bench1g")
    index = load_index(ckpt)
    assert 0.9e9 < index["metadata"]["total_size"] < 1.3e9
    assert len(set(index["weight_map"].values())) == get_preset("bench1g").n_shards
