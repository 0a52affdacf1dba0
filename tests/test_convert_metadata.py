"""general.* metadata and chat-template keys against llama.cpp's own gguf-py (from the llama-cpp-python 0.3.36
sdist), run in this process on the same inputs: model cards, generation configs, config.json, directory names.

The end-to-end proofs (whole files byte-identical to convert_hf_to_gguf.py's) are in test_convert_reference.py;
these cover many more cards and names than whole conversions could, quickly. The glue that
convert_hf_to_gguf's `prepare_metadata` adds around gguf-py (name fallback, size label) is restated in
`upstream_general` below.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantize import metadata, vocab
from quantize.gguf_reader import GGUFValueType as VT
from quantize.writer import GGUFWriter
from tests.fixtures.checkpoint import model_card
from tests.llamacpp_src import reference_gguf_py

HASH = "9a2c0d5b7e41f3a8c6b0e2d4f1a3c5e7b9d0f2a4"


@pytest.fixture(scope="module")
def gguf():
    """llama.cpp's gguf-py package, imported from the sdist."""
    with reference_gguf_py() as mod:
        yield mod


# Tensors of a small MoE model: (name, ggml shape), 8 experts.
TENSORS = [SimpleNamespace(name="token_embd.weight", shape=(256, 3072)),
           SimpleNamespace(name="blk.0.ffn_gate_exps.weight", shape=(256, 512, 8)),
           SimpleNamespace(name="blk.0.ffn_down_exps.weight", shape=(512, 256, 8)),
           SimpleNamespace(name="blk.0.attn_q.weight", shape=(256, 1536))]


def upstream_general(gguf, src: Path, out: Path) -> bytes:
    """What convert_hf_to_gguf writes up to the model metadata: GGUFWriter (architecture), set_type, then
    prepare_metadata's Metadata.load + name fallback + size label + set_gguf_meta_model. Header+KV bytes."""
    counter = gguf.GGUFWriter(None, "glm4moe")
    for t in TENSORS:  # gguf-py counts parameters over the tensor infos, shapes in numpy order
        counter.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype("float32"), 0,
                                raw_dtype=gguf.GGMLQuantizationType.BF16)
    total, shared, expert, count = counter.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src, None, total)
    if meta.name is None:
        meta.name = src.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    w = gguf.GGUFWriter(out, "glm4moe")
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return out.read_bytes()


def ours_general(src: Path, **kw) -> bytes:
    w = GGUFWriter(src.parent / "unused.gguf")
    for key, vt, value in metadata.general_kv(src, TENSORS, "glm4moe", **kw):
        if vt == VT.ARRAY:
            w.add_array(key, *value)
        else:
            w.add_kv(key, vt, value)
    return w.header_bytes()


def assert_same_kv(theirs: bytes, ours: bytes) -> None:
    """Same header and KV section: ours pads the (tensor-less) header to the alignment, theirs stops."""
    assert ours[: len(theirs)] == theirs, _diff(theirs, ours)
    assert len(ours) - len(theirs) < 32 and not ours[len(theirs):].strip(b"\0")


def _diff(theirs: bytes, ours: bytes) -> str:
    i = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    lo, hi = max(0, i - 60), i + 60
    return f"first difference at byte {i}: theirs {theirs[lo:hi]!r} ours {ours[lo:hi]!r}"


def checkpoint_dir(root: Path, name: str, card: str | None, gen: dict | str | None = None,
                   config: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config or {"architectures": ["Glm4MoeForCausalLM"]}))
    if card is not None:
        (d / "README.md").write_text(card, encoding="utf-8")
    if gen is not None:
        (d / "generation_config.json").write_text(gen if isinstance(gen, str) else json.dumps(gen))
    return d


ZAI_GEN = {"_from_model_config": True, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
           "temperature": 1.0, "top_p": 0.95, "top_k": 40, "transformers_version": "4.54.0"}
COMMUNITY_CARD = """---
base_model:
- zai-org/GLM-4.6
- https://huggingface.co/zai-org/GLM-4.5-Air
- https://example.com/models/glm
- {name: Custom Base, organization: Someone, version: v2}
tags:
\t- glm
\t- moe
datasets:
- zai-org/agentic-data-v1
- https://huggingface.co/datasets/x
license: [mit, apache-2.0]
license_link: https://huggingface.co/zai-org/GLM-4.6/blob/main/LICENSE
language:
- en
- zh
- no
model_name: GLM-4.6 Derestricted
model_creator: someone
pipeline_tag: text-generation
---
# body
"""


CARD_CASES = [
    ("GLM-4.5-Air", model_card("GLM-4.5-Air", False), ZAI_GEN),
    ("GLM-4.6-FP8", model_card("GLM-4.6-FP8", True), ZAI_GEN),
    ("GLM-4.7", model_card("GLM-4.7", False), {**ZAI_GEN, "top_k": None}),
    ("GLM-4.5-Air-Base", model_card("GLM-4.5-Air-Base", False), {"eos_token_id": [1], "pad_token_id": 1}),
    (HASH, model_card("GLM-4.6", False), ZAI_GEN),
    ("GLM-4.6-Derestricted-106B-A12B-Instruct-v1.1", COMMUNITY_CARD,
     {"repetition_penalty": 1.05, "min_p": 0.01, "sequence": "edkypmxt", "mirostat": 2, "temperature": 1}),
    ("glm-4.5-air-bf16-q4_k_m", None, "{not json"),
    ("Meta-Llama-3.1-8B-Instruct", "no front matter\n", None),
    ("bloom-7b1-chat-iter3", "---\n- a list, not a mapping\n---\n", None),
    ("Mixtral-8x7B-v0.1", "---\nbase_model:\nlicense: other\nlicense_name: custom\n---\n", {"penalty_repeat": 1.1}),
    ("x", "", {}),
]


@pytest.mark.parametrize("name,card,gen", CARD_CASES, ids=[c[0][:40] for c in CARD_CASES])
def test_model_metadata_matches_gguf_py(gguf, tmp_path, name, card, gen):
    src = checkpoint_dir(tmp_path / "m", name, card, gen)
    assert_same_kv(upstream_general(gguf, src, tmp_path / "theirs.gguf"), ours_general(src))


def test_name_or_path_in_config_is_used_before_the_directory_name(gguf, tmp_path):
    src = checkpoint_dir(tmp_path, HASH, None, None, {"_name_or_path": "zai-org/GLM-4.5-Air", "architectures": []})
    assert_same_kv(upstream_general(gguf, src, tmp_path / "theirs.gguf"), ours_general(src))


def test_snapshot_directory_is_named_after_its_repository(gguf, tmp_path):
    """A Hugging Face cache snapshot gets the metadata llama.cpp writes for the same files under the
    repository's name; `source_name` overrides (glmlocal pull passes the repository name)."""
    snapshots = tmp_path / "hub" / "models--zai-org--GLM-4.6" / "snapshots"
    snap = checkpoint_dir(snapshots, HASH, model_card("GLM-4.6", False))
    named = checkpoint_dir(tmp_path, "GLM-4.6", model_card("GLM-4.6", False))
    assert metadata.source_name(snap) == "GLM-4.6" and metadata.source_name(named) == "GLM-4.6"
    theirs_named = upstream_general(gguf, named, tmp_path / "named.gguf")
    assert_same_kv(theirs_named, ours_general(snap))
    assert_same_kv(upstream_general(gguf, snap, tmp_path / "snap.gguf"), ours_general(snap, dir_name=HASH))


def test_zai_org_metadata_values(tmp_path):
    src = checkpoint_dir(tmp_path, "GLM-4.6", model_card("GLM-4.6", False), ZAI_GEN)
    kv = {k: (vt, v) for k, vt, v in metadata.general_kv(src, TENSORS, "glm4moe")}
    assert kv["general.name"] == (VT.STRING, "GLM 4.6")
    assert kv["general.basename"] == (VT.STRING, "GLM") and kv["general.version"] == (VT.STRING, "4.6")
    assert kv["general.license"] == (VT.STRING, "mit")
    assert kv["general.tags"] == (VT.ARRAY, (VT.STRING, ["text-generation"]))
    assert kv["general.languages"] == (VT.ARRAY, (VT.STRING, ["en", "zh"]))
    assert kv["general.sampling.top_k"] == (VT.INT32, 40) and kv["general.sampling.temp"] == (VT.FLOAT32, 1.0)
    assert kv["general.size_label"] == (VT.STRING, "8x1.4M")  # 1.18M shared + 0.26M per expert


def test_card_values_gguf_py_cannot_write_are_written_as_text(tmp_path):
    """gguf-py crashes on a non-string scalar (`version: 4.6` is a float in YAML) or a mixed list; we write text."""
    src = checkpoint_dir(tmp_path, "GLM-4.6", "---\nversion: 4.6\ntags: [glm, 2025]\n---\n")
    kv = {k: (vt, v) for k, vt, v in metadata.general_kv(src, TENSORS, "glm4moe")}
    assert kv["general.version"] == (VT.STRING, "4.6")
    assert kv["general.tags"] == (VT.ARRAY, (VT.STRING, ["glm", "2025"]))


def test_invalid_front_matter_is_a_clear_error(tmp_path):
    from glmlocal.errors import ConversionError

    src = checkpoint_dir(tmp_path, "GLM-4.6", "---\nlicense: [mit\n---\n")
    with pytest.raises(ConversionError, match="README.md has invalid YAML front matter"):
        metadata.general_kv(src, TENSORS, "glm4moe")


NAME_PARTS = st.sampled_from(["GLM", "glm", "4.5", "4.6", "Air", "FP8", "Base", "7B", "8x7B", "A12B", "106b", "v0.1",
                              "Instruct", "chat", "bf16", "Q4_K_M", "small", "xl", "it", "2507", "1.5", "iter3", "A",
                              "x", "lora", "", "mini", "7b1", "0.5B", "1_5B", "3T", "Vision", "hf", "GGUF"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(org=st.sampled_from([None, "zai-org", ".", "./x", "someone"]), parts=st.lists(NAME_PARTS, max_size=6),
       total=st.sampled_from([0, 4_000_000, -5_000_000, 106_000_000_000, 7_000_000_000]))
def test_model_id_components_match_gguf_py(gguf, org, parts, total):
    model_id = "-".join(parts) if org is None else f"{org}/{'-'.join(parts)}"
    assert metadata.model_id_components(model_id, total) == gguf.Metadata.get_model_id_components(model_id, total)
    assert metadata.id_to_title(model_id) == gguf.Metadata.id_to_title(model_id)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_id=st.text(max_size=24), total=st.sampled_from([0, 4_000_000, -1]))
def test_model_id_components_match_gguf_py_on_any_text(gguf, model_id, total):
    try:
        expected = gguf.Metadata.get_model_id_components(model_id, total)
    except Exception as e:  # noqa: BLE001 - whatever gguf-py raises, we raise the same type
        with pytest.raises(type(e)):
            metadata.model_id_components(model_id, total)
        return
    assert metadata.model_id_components(model_id, total) == expected


# ---------------------------------------------------------------------------------------------- chat templates

TOKENIZER = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": []}


def template_dir(root: Path, tcfg: dict | None, jinja: str | None = None, extra: dict | None = None,
                 json_tmpl=None) -> Path:
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    if tcfg is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tcfg))
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja)
    for name, text in (extra or {}).items():
        (root / "additional_chat_templates").mkdir(exist_ok=True)
        (root / "additional_chat_templates" / f"{name}.jinja").write_text(text)
    if json_tmpl is not None:
        (root / "chat_template.json").write_text(json.dumps({"chat_template": json_tmpl}))
    return root


@pytest.mark.parametrize("tcfg,jinja,extra,json_tmpl", [
    ({"eos_token": "a"}, "J", None, None),  # zai-org: template only in chat_template.jinja
    ({"chat_template": "C"}, "J", None, None),  # tokenizer_config.json wins
    ({"eos_token": "a"}, "J", {"tool_use": "T"}, None),  # additional_chat_templates/ -> named templates
    ({"eos_token": "a"}, "J", {"tool use": "T", "rag": ""}, None),
    ({"chat_template": [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}, {"name": "x"}]},
     None, None, None),
    ({"chat_template": [{"name": "rag", "template": "R"}]}, None, None, None),  # no default template
    ({"chat_template": None}, "J", None, None),  # an explicit null hides the .jinja
    ({}, "J", None, None),  # empty tokenizer_config.json: gguf-py reads no template at all
    (None, "J", None, None),  # no tokenizer_config.json either
    ({"eos_token": "a"}, None, None, "from json"),
    ({"eos_token": "a"}, None, None, [{"name": "default", "template": "D"}]),
    ({"chat_template": 42}, "J", None, None),  # bad type: ignored
])
def test_chat_template_keys_match_gguf_py(gguf, tmp_path, tcfg, jinja, extra, json_tmpl):
    src = template_dir(tmp_path / "ckpt", tcfg, jinja, extra, json_tmpl)
    sv = gguf.SpecialVocab(src, load_merges=True)
    w = gguf.GGUFWriter(None, "glm4moe")
    if sv.chat_template is not None:
        w.add_chat_template(sv.chat_template)
    theirs = {k: (v.type, v.value) for k, v in w.kv_data[0].items() if k != "general.architecture"}
    loaded = json.loads((src / "tokenizer_config.json").read_text()) if tcfg is not None else {}
    kv = vocab.chat_template_kv(vocab.read_chat_template(src, loaded))
    ours = {k: (vt, v[1] if vt == VT.ARRAY else v) for k, vt, v in kv}
    # gguf-py lists the names from a set (order varies between runs); ours are sorted
    if "tokenizer.chat_templates" in theirs:
        t, names = theirs["tokenizer.chat_templates"]
        theirs["tokenizer.chat_templates"] = (t, sorted(names))
    assert list(ours) == list(theirs) and ours == theirs


# ---------------------------------------------------------------------------------------------- RoPE

def _hparams(tmp_path, **changes) -> dict:
    from quantize.glm4moe import GLMConfig, hparams_kv
    from tests.fixtures.checkpoint import PRESETS, hf_config

    config = {**hf_config(PRESETS["tiny"], 3072, [0, 1, 2]), **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return {k: (vt, v) for k, vt, v in hparams_kv(GLMConfig.load(tmp_path), True, 32)}


def test_glm_rope_scaling_null_writes_no_scaling_keys(tmp_path):
    """zai-org's configs have `rope_scaling: null`: base frequency and partial rotary dimension only."""
    kv = _hparams(tmp_path)
    assert not any(".rope.scaling." in k for k in kv)
    assert kv["glm4moe.rope.freq_base"] == (VT.FLOAT32, 1000000) and kv["glm4moe.rope.dimension_count"][1] == 32


def test_transformers_v5_rope_parameters_give_the_same_keys(tmp_path):
    """A checkpoint re-saved by transformers 5 carries `rope_parameters` instead of rope_theta/rope_scaling."""
    v4 = _hparams(tmp_path)
    v5 = _hparams(tmp_path, rope_parameters={"rope_theta": 1000000, "rope_type": "default",
                                             "partial_rotary_factor": 0.5})
    assert v5 == v4 and list(v5) == list(v4)


def test_yarn_without_original_context_is_a_clear_error(tmp_path):
    """llama.cpp's converter stops with a KeyError there; ours says what is missing."""
    from glmlocal.errors import ConversionError

    with pytest.raises(ConversionError, match="original_max_position_embeddings"):
        _hparams(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
