"""models.toml and the registry: lookup, aliases, errors, and values checked against public numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmlocal.errors import InputError
from glmlocal.models.registry import (
    QUANTS,
    all_models,
    canonical_quant,
    check_quant,
    find_model,
    get_model,
    normalize_quant,
    spec_from_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent


def test_package_copy_is_identical():
    """The package ships glmlocal/models.toml; it must be byte-identical to the root source of truth."""
    assert (REPO / "glmlocal" / "models.toml").read_bytes() == (REPO / "models.toml").read_bytes()


def test_every_family_and_variant_is_listed():
    names = {m.name for m in all_models()}
    assert {"glm-4.5", "glm-4.5-air", "glm-4.6", "glm-4.7"} <= names
    assert {"glm-4.5-fp8", "glm-4.5-air-fp8", "glm-4.6-fp8", "glm-4.7-fp8"} <= names
    assert {"glm-4.5-base", "glm-4.5-air-base"} <= names
    # No Base checkpoint was published for 4.6 / 4.7.
    assert not names & {"glm-4.6-base", "glm-4.7-base"}


@pytest.mark.parametrize("alias,name", [
    ("glm4.6", "glm-4.6"), ("GLM-4.6", "glm-4.6"), ("zai-org/GLM-4.6", "glm-4.6"),
    ("ZAI-ORG/glm-4.5-air", "glm-4.5-air"), ("https://huggingface.co/zai-org/GLM-4.7", "glm-4.7"),
    ("glm4.7-fp8", "glm-4.7-fp8"), (" air ", "glm-4.5-air"),
])
def test_lookup_by_alias_is_case_insensitive(alias, name):
    assert get_model(alias).name == name


def test_unknown_model_lists_known_names():
    with pytest.raises(InputError) as e:
        get_model("glm-9")
    assert "glm-9" in e.value.one_line()
    for name in ("glm-4.5", "glm-4.6", "glm-4.7", "glm-4.5-air"):
        assert name in e.value.one_line()
    assert find_model("glm-9") is None


def test_chat_family_per_model():
    fam = {m.name: m.family for m in all_models()}
    assert fam["glm-4.5"] == fam["glm-4.5-air"] == fam["glm-4.6"] == "glm45"
    assert fam["glm-4.7"] == fam["glm-4.7-fp8"] == "glm47"
    assert not get_model("glm-4.5-base").chat and get_model("glm-4.6").chat


def test_hyperparameters_match_the_published_configs():
    """Values of config.json as published (llama.cpp reference table, GLM-4.5 training scripts)."""
    big, air = get_model("glm-4.6").hparams, get_model("glm-4.5-air").hparams
    assert (big.num_hidden_layers, big.hidden_size, big.intermediate_size, big.moe_intermediate_size) == (92, 5120, 12288, 1536)
    assert (big.n_routed_experts, big.num_experts_per_tok, big.n_shared_experts, big.first_k_dense_replace) == (160, 8, 1, 3)
    assert (big.num_attention_heads, big.num_key_value_heads, big.head_dim) == (96, 8, 128)
    assert big.use_qk_norm and big.routed_scaling_factor == 2.5 and big.max_position_embeddings == 202752
    assert (air.num_hidden_layers, air.hidden_size, air.intermediate_size, air.moe_intermediate_size) == (46, 4096, 10944, 1408)
    assert (air.n_routed_experts, air.first_k_dense_replace, air.use_qk_norm) == (128, 1, False)
    assert get_model("glm-4.5").hparams.max_position_embeddings == 131072
    for m in all_models():
        hp = m.hparams
        assert hp.vocab_size == 151552 and hp.num_nextn_predict_layers == 1
        assert hp.rope_theta == 1e6 and hp.partial_rotary_factor == 0.5
    # Variants inherit the hyperparameters of the model they package.
    assert get_model("glm-4.6-fp8").hparams == big
    assert get_model("glm-4.5-air-base").hparams == air


def test_sources_and_published_gguf():
    m = get_model("glm-4.6")
    assert m.sources == {"bf16": "zai-org/GLM-4.6", "fp8": "zai-org/GLM-4.6-FP8"}
    assert m.source_repo == "zai-org/GLM-4.6"
    g = m.published_gguf("Q4_K_M")
    assert g.repo == "unsloth/GLM-4.6-GGUF" and g.pattern == "Q4_K_M/GLM-4.6-Q4_K_M-*.gguf"
    # The glob matches every part of the split set as published.
    from fnmatch import fnmatch

    assert fnmatch("Q4_K_M/GLM-4.6-Q4_K_M-00003-of-00005.gguf", g.pattern)
    assert not fnmatch("Q6_K/GLM-4.6-Q6_K-00001-of-00006.gguf", g.pattern)
    assert get_model("glm-4.6-fp8").source_repo == "zai-org/GLM-4.6-FP8"
    assert get_model("glm-4.6-fp8").published_gguf("q4_k_m") is None  # converted from FP8 locally
    for spec in all_models():
        assert all(repo.startswith("zai-org/") for repo in spec.sources.values())
        assert all(q == canonical_quant(q) for q in spec.gguf)  # keys stored canonical
        for q, g in spec.gguf.items():
            # the glob names the quant, so a registry typo cannot silently pull another quant's files
            assert q.upper() in g.pattern.upper(), (spec.name, q, g.pattern)


def test_quant_names_normalize_and_reject():
    assert normalize_quant("Q4_K_M") == "q4_k_m" == normalize_quant("q4-k-m")
    for spelling in ("UD-Q2_K_XL", "ud-q2_k_xl", "ud_q2_k_xl", " Ud-Q2-K-XL "):
        assert normalize_quant(spelling) == "ud-q2_k_xl"
    with pytest.raises(InputError) as e:
        normalize_quant("q3_k_s")
    line = e.value.one_line()
    assert "q3_k_s" in line and "q4_k_m" in line and "ud-q2_k_xl" in line


def test_published_low_bit_quants_for_24gb_plus_128gb():
    """The 355B models list the published low-bit GGUFs that fit 24 GB VRAM + 128 GB RAM (UD-Q2_K_XL ~135 GB)."""
    from fnmatch import fnmatch

    for name in ("glm-4.5", "glm-4.6", "glm-4.7"):
        spec = get_model(name)
        assert {"ud-q2_k_xl", "ud-iq1_m", "ud-q4_k_xl"} <= set(spec.published_only())
        assert not set(spec.published_only()) & set(QUANTS)
    g = get_model("glm-4.6").published_gguf("UD-Q2_K_XL")
    assert g.repo == "unsloth/GLM-4.6-GGUF"
    assert fnmatch("UD-Q2_K_XL/GLM-4.6-UD-Q2_K_XL-00002-of-00003.gguf", g.pattern)
    assert not fnmatch("UD-Q3_K_XL/GLM-4.6-UD-Q3_K_XL-00001-of-00004.gguf", g.pattern)
    assert not fnmatch("Q2_K_L/GLM-4.6-Q2_K_L-00001-of-00003.gguf", g.pattern)
    # Air: one file at the root or a folder of parts, both matched
    air = get_model("glm-4.5-air").published_gguf("ud-q2_k_xl")
    assert fnmatch("GLM-4.5-Air-UD-Q2_K_XL.gguf", air.pattern)
    assert fnmatch("UD-Q2_K_XL/GLM-4.5-Air-UD-Q2_K_XL-00001-of-00002.gguf", air.pattern)
    assert not fnmatch("GLM-4.5-Air-UD-Q3_K_XL.gguf", air.pattern)


def test_check_quant_refuses_what_cannot_be_had():
    assert check_quant(get_model("glm-4.6"), "UD-Q2_K_XL") == "ud-q2_k_xl"
    assert check_quant(get_model("glm-4.6"), "q4_k_m", from_source=True) == "q4_k_m"
    with pytest.raises(InputError) as e:
        check_quant(get_model("glm-4.6"), "ud-q2_k_xl", from_source=True)
    assert "the converter cannot make ud-q2_k_xl" in e.value.one_line() and "drop --from-source" in e.value.hint
    with pytest.raises(InputError, match="glm-4.6-fp8 has no published ud-q2_k_xl GGUF"):
        check_quant(get_model("glm-4.6-fp8"), "ud-q2_k_xl")


def test_spec_from_a_checkpoint_config(tmp_path):
    import json

    cfg = {"architectures": ["Glm4MoeForCausalLM"], "num_hidden_layers": 3, "num_nextn_predict_layers": 1,
           "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
           "intermediate_size": 512, "moe_intermediate_size": 256, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "vocab_size": 3072,
           "max_position_embeddings": 4096, "rope_theta": 1e6, "use_qk_norm": True, "attention_bias": True,
           "routed_scaling_factor": 2.5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = spec_from_checkpoint(tmp_path)
    assert spec.hparams.n_routed_experts == 8 and spec.hparams.partial_rotary_factor == 0.5
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not a GLM-4 MoE"):
        spec_from_checkpoint(tmp_path)
