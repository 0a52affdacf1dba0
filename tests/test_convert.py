"""Converter: our one-pass quantized GGUFs are byte-identical to llama.cpp's `llama_model_quantize` run on
our BF16 GGUF; files load in llama.cpp as glm4moe; FP8 sources equal their BF16 twins; --no-mtp."""

from __future__ import annotations

import ctypes
import filecmp

import pytest

from quantize.convert import convert
from quantize.gguf_reader import read_gguf
from quantize.recipe import FTYPES
from tests.cli_run import run_piped

llama_cpp = pytest.importorskip("llama_cpp")


def llama_quantize(src, dst, quant: str) -> None:
    """llama.cpp's own quantizer (llama-quantize) through llama-cpp-python."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[quant][0]
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def assert_same_gguf(ours, ref) -> None:
    """Same KV (keys, order, types, values), same tensors (names, order, types, shapes, bytes)."""
    a, b = read_gguf(ours), read_gguf(ref)
    assert list(a.metadata) == list(b.metadata)
    for k in b.metadata:
        assert (a.types[k], a.metadata[k]) == (b.types[k], b.metadata[k]), k
    assert [(t.name, t.ggml_type, t.shape) for t in a.tensors] == [(t.name, t.ggml_type, t.shape) for t in b.tensors]
    for t in b.tensors:
        assert a.tensor_bytes(t.name) == b.tensor_bytes(t.name), t.name
    assert filecmp.cmp(ours, ref, shallow=False)  # and therefore the whole file


@pytest.mark.parametrize("preset", ["tiny", "air"])
@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k", "q8_0"])
def test_direct_quant_identical_to_llama_quantize(gguf_factory, tmp_path, preset, quant):
    bf16 = gguf_factory(preset, "bf16")
    ref = tmp_path / f"ref-{quant}.gguf"
    llama_quantize(bf16, ref, quant)
    assert_same_gguf(gguf_factory(preset, quant), ref)
    # the fixtures are converted as zai-org repositories: model card, sampling defaults and the name's parts
    # reach llama-quantize's output unchanged, so the comparison above covers them
    meta = read_gguf(ref).metadata
    assert meta["general.license"] == "mit" and meta["general.languages"] == ["en", "zh"]
    assert meta["general.tags"] == ["text-generation"] and meta["general.sampling.top_k"] == 40
    assert meta["general.name"] == {"tiny": "GLM 4.6", "air": "GLM 4.5 Air"}[preset]
    assert meta.get("general.version") == {"tiny": "4.6", "air": None}[preset]


def test_type_mix_shows_fallbacks_and_mtp(gguf_factory):
    """air rows (352 / 160) are not multiples of 256: ffn_down* fall back; the MTP block (blk.3) counts."""
    g = read_gguf(gguf_factory("air", "q4_k_m"))
    types = {t.name: t.type_name for t in g.tensors}
    assert g.metadata["general.file_type"] == 15 and g.metadata["glm4moe.block_count"] == 4
    # use_more_bits(i, 4) holds for i = 2, 3 only: Q6_K -> fallback Q8_0 there, Q4_K -> Q5_0 elsewhere
    assert types["blk.0.ffn_down.weight"] == "Q5_0" and types["blk.1.ffn_down_exps.weight"] == "Q5_0"
    assert types["blk.2.ffn_down_exps.weight"] == "Q8_0"
    assert types["blk.3.ffn_down_exps.weight"] == "Q8_0"  # the NextN block counts in n_layer_all
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.3.nextn.eh_proj.weight"] == "Q4_K"
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"


LOAD = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
out = llm.create_completion("[gMASK]<sop>hello", max_tokens=4, temperature=0.0)
print(llm.metadata["general.architecture"], out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"])
"""


@pytest.mark.parametrize("preset,quant,mtp", [("tiny", "q4_k_m", True), ("air", "q8_0", True),
                                             ("tiny45", "bf16", True), ("air", "q6_k", True),
                                             ("tiny45", "q4_k_m", False)])
def test_loads_and_generates_in_llama_cpp_as_glm4moe(gguf_factory, preset, quant, mtp):
    """In a child process, so a crashing llama.cpp build fails this test instead of the whole session."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LOAD, str(gguf_factory(preset, quant, mtp=mtp))], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"llama.cpp crashed (rc {proc.returncode}): {proc.stderr[-1500:]}"
    arch, finish, n = proc.stdout.split()
    # llama-cpp-python may run a token or two past max_tokens to finish a split UTF-8 character
    assert arch == "glm4moe" and finish in ("length", "stop") and int(n) <= 8


@pytest.mark.parametrize("fmt", ["block", "compressed-tensors"])
@pytest.mark.parametrize("quant", ["bf16", "q4_k_m"])
def test_fp8_source_equals_bf16_twin(fp8_twin_factory, tmp_path, fmt, quant):
    from tests.conftest import build_cached_checkpoint

    fp8_dir = build_cached_checkpoint("tiny", fmt)
    twin = fp8_twin_factory("tiny", fmt)
    # the same name for both: general.* derive from the folder name otherwise
    a = convert(fp8_dir, tmp_path / "fp8.gguf", quant=quant, source_name="GLM-4.6-FP8").path
    b = convert(twin, tmp_path / "twin.gguf", quant=quant, source_name="GLM-4.6-FP8").path
    assert filecmp.cmp(a, b, shallow=False)


def test_no_mtp_drops_nextn_block(gguf_factory):
    with_mtp = read_gguf(gguf_factory("tiny45", "q4_k_m"))
    g = read_gguf(gguf_factory("tiny45", "q4_k_m", mtp=False))
    assert g.metadata["glm4moe.block_count"] == 3 and "glm4moe.nextn_predict_layers" not in g.metadata
    assert with_mtp.metadata["glm4moe.block_count"] == 4 and with_mtp.metadata["glm4moe.nextn_predict_layers"] == 1
    assert not any(t.name.startswith("blk.3.") for t in g.tensors)
    assert "blk.3.nextn.shared_head_head.weight" in with_mtp and "blk.3.nextn.embed_tokens.weight" in with_mtp
    # without the NextN block, n_layer_all is 3: layer 2 is a more-bits layer (i >= 7*3/8)
    assert g.tensor("blk.2.ffn_down_exps.weight").type_name == "Q6_K"


def test_progress_events_and_result(tiny_ckpt, tmp_path):
    events = []
    r = convert(tiny_ckpt, tmp_path / "o.gguf", quant="q8_0", threads=2, progress=events.append)
    assert r.path == tmp_path / "o.gguf" and r.path.stat().st_size == r.bytes_written
    assert events and events[-1].bytes_done == events[-1].bytes_total
    assert all(a.bytes_done < b.bytes_done for a, b in zip(events, events[1:]))
    assert events[-1].mb_per_s > 0 and events[-1].eta_s == 0
    assert not (tmp_path / "o.gguf.part").exists()


def test_cli_convert_writes_file_and_summary(tiny_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run_piped(["convert", str(tiny_ckpt), "--quant", "q6_k", "-o", str(out), "--threads", "2", "--no-mtp"])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr and "Q6_K" in proc.stderr
    g = read_gguf(out)
    assert g.metadata["general.file_type"] == 18 and g.metadata["glm4moe.block_count"] == 3


def test_default_output_name_beside_checkpoint_or_in_cwd_for_hf_snapshots(tmp_path, monkeypatch):
    """A plain checkpoint dir gets `<dir>-<QUANT>.gguf` beside it; a Hugging Face cache snapshot
    (named by commit) gets `./<repo name>-<QUANT>.gguf`, never a file inside the cache."""
    from glmlocal.cli.convert import default_convert_output

    plain = tmp_path / "GLM-4.5-Air"
    plain.mkdir()
    assert default_convert_output(plain, "q4_k_m") == tmp_path / "GLM-4.5-Air-Q4_K_M.gguf"
    snap = tmp_path / "hub" / "models--zai-org--GLM-4.6" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert default_convert_output(snap, "q8_0") == work / "GLM-4.6-Q8_0.gguf"


def test_tensor_names_are_gguf_py_tensor_map_for_glm4moe():
    """Our HF -> GGUF name table is the glm4moe part of gguf-py's TensorNameMap (what convert_hf_to_gguf maps
    with), checked name by name; merged experts map like the converter's `mlp.experts.<w>_proj` stand-ins."""
    import gguf

    from quantize.glm4moe import _GLOBAL_MAP, _LAYER_MAP, map_name

    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.GLM4_MOE, 4)
    names = list(_GLOBAL_MAP) + [f"model.layers.3.{rest}" for rest in _LAYER_MAP]
    names += [f"model.layers.2.mlp.experts.5.{w}_proj.weight" for w in ("gate", "up", "down")]
    assert len(names) == len(_GLOBAL_MAP) + len(_LAYER_MAP) + 3
    for hf in names:
        # conversion/base.py renames the router bias before mapping; experts are mapped after merging
        key = hf.replace("e_score_correction_bias", "e_score_correction.bias").replace("experts.5.", "experts.")
        assert map_name(hf)[0] == tmap.get_name(key, try_suffixes=(".weight", ".bias")), hf
