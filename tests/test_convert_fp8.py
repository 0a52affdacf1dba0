"""FP8 checkpoints converted as they declare themselves (quantize/fp8.py).

Every layout of tests/fixtures/fp8.py (fp8 with 128x128 and 96x128 blocks, compressed-tensors per channel, per
tensor and per 128x128 / 64x32 block; scales in F32, BF16 and F16) on the "air" preset, whose rows and columns
(352, 160) are not multiples of the blocks, so edge tiles are cut short in both directions:
- BF16: byte-identical to llama.cpp's convert_hf_to_gguf.py run on the same FP8 checkpoint; Q4_K_M:
  byte-identical to llama-quantize run on that file;
- streamed in slabs that start on tile boundaries, chunks that do not, and the same bytes either way;
- any row range read equals the fixture's own (torch) dequantization, and each weight's scales are read once.
Every scheme or tensor the converter does not read is one error line from `glmlocal convert`, raised before the
output is opened.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from quantize import convert as convert_mod
from quantize.convert import convert
from quantize.fp8 import SchemeError, read_scheme
from quantize.safetensors_io import Checkpoint, f32_to_bf16_bits
from quantize.writer import GGUFWriter
from tests.fixtures.checkpoint import repo_name
from tests.fixtures.fp8 import LAYOUTS
from tests.test_convert import assert_same_gguf, llama_quantize
from tests.test_convert_errors import (
    assert_clean_failure,
    clone,
    rewrite_shard,
    run_cli,
)
from tests.test_convert_reference import linked_copy, named, reference_convert

torch = pytest.importorskip("torch")

PRESET = "air"


def _channel_declared(ckpt: Path, dest: Path) -> Path:
    """The per-tensor checkpoint with its strategy declared "channel": llama.cpp asserts channel or block, but its
    per-channel path broadcasts a [1] scale over the weight, so this is how it converts the same tensors."""
    config = json.loads((ckpt / "config.json").read_text())
    next(iter(config["quantization_config"]["config_groups"].values()))["weights"]["strategy"] = "channel"
    return linked_copy(ckpt, dest, write={"config.json": json.dumps(config, indent=2)})


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_byte_identical_to_llama_cpp_on_the_same_fp8_checkpoint(ckpt_factory, gguf_factory, tmp_path, layout):
    ckpt, name = ckpt_factory(PRESET, layout), repo_name(PRESET, layout)
    src = (_channel_declared(ckpt, tmp_path / "declared" / name) if layout == "ct-tensor"
           else named(ckpt, tmp_path / "by-name", name))
    ref = tmp_path / "ref-bf16.gguf"
    reference_convert(src, ref, "bf16")
    assert filecmp.cmp(gguf_factory(PRESET, "bf16", fp8=layout), ref, shallow=False)
    ref_q = tmp_path / "ref-q4_k_m.gguf"
    llama_quantize(ref, ref_q, "q4_k_m")
    assert_same_gguf(gguf_factory(PRESET, "q4_k_m", fp8=layout), ref_q)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_row_range_equals_the_fixtures_dequantization(ckpt_factory, layout):
    from safetensors.torch import load_file

    ckpt_dir = ckpt_factory(PRESET, layout)
    ckpt = Checkpoint(ckpt_dir, read_scheme(json.loads((ckpt_dir / "config.json").read_text())))
    names = [n for n in ckpt.tilings if n.endswith(("layers.0.mlp.down_proj.weight", "layers.1.self_attn.k_proj.weight",
                                                     "layers.2.mlp.experts.5.up_proj.weight"))]
    assert len(names) == 3
    reads: list[str] = []
    read_raw = ckpt.read_raw
    ckpt.read_raw = lambda n: reads.append(n) or read_raw(n)
    for name in names:
        tiling, entry = ckpt.tilings[name], ckpt.entries[name]
        stored = load_file(str(entry.path))
        want = _fixture_dequant(stored[name], stored[tiling.scale], layout)
        rows = entry.shape[0]
        for r0, r1 in ((0, rows), (37, rows - 5), (rows - 1, rows), (tiling.rows % rows, min(rows, 3 * tiling.rows))):
            assert (f32_to_bf16_bits(ckpt.read_rows_f32(name, r0, r1)) == want[r0:r1]).all(), (name, r0, r1)
    assert reads == [ckpt.tilings[n].scale for n in names]  # each weight's scales read once for its four ranges


def _fixture_dequant(q, scale, layout: str) -> np.ndarray:
    """The fixture's torch dequantization as BF16 bit patterns."""
    from tests.fixtures.fp8 import dequantize

    return dequantize(q, scale, layout).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("layout,quant", [("fp8-96x128", "q4_k_m"), ("ct-block-64x32", "bf16")])
def test_slabs_start_on_tile_rows_and_bytes_do_not_depend_on_them(ckpt_factory, gguf_factory, tmp_path,
                                                                  monkeypatch, layout, quant):
    """Slabs of ~100 rows and chunks of 64 rows: slabs start on multiples of the tile height, chunks cut through
    tiles, and the file is the same as the one written in whole tensors."""
    monkeypatch.setattr(convert_mod, "SLAB_BYTES", 100 * 256 * 4)
    monkeypatch.setattr(convert_mod, "CHUNK_BYTES", 1)  # raised to MIN_CHUNK_ELEMENTS (64 rows of 256)
    src = ckpt_factory(PRESET, layout)
    ckpt, _, jobs = convert_mod.plan(src, quant)
    height = LAYOUTS[layout].block[0]
    starts = [(s, r0) for _, parts in convert_mod._slabs(ckpt, jobs) for s, r0, _ in parts if s in ckpt.tilings]
    assert any(r0 > 0 for _, r0 in starts)  # some FP8 tensor is split into several slabs
    assert all(r0 % height == 0 for _, r0 in starts)
    out = convert(src, tmp_path / "slabs.gguf", quant=quant, threads=2, source_name=repo_name(PRESET, layout)).path
    assert filecmp.cmp(out, gguf_factory(PRESET, quant, fp8=layout), shallow=False)


# ---------------------------------------------------------------------------------------------- refusals

def _config(edit):
    """An edit of config.json (edit(config) changes the dict in place)."""
    def run(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        edit(config)
        (src / "config.json").write_text(json.dumps(config))
    return run


def _qc(edit):
    return _config(lambda config: edit(config["quantization_config"]))


def _weights(**changes):
    return _qc(lambda qc: next(iter(qc["config_groups"].values()))["weights"].update(changes))


def _tensors(edit, index_drop: str | None = None, holder: str = "lm_head.weight"):
    """An edit of the shard holding `holder` (and the index entry of a dropped tensor)."""
    def run(src: Path) -> None:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        rewrite_shard(src / index["weight_map"][index_drop or holder], edit)
        if index_drop:
            del index["weight_map"][index_drop]
            (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return run


UP = "model.layers.1.mlp.experts.3.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"  # the first FP8 tensor of the first shard
CT, BLOCK, CT_BLOCK = "compressed-tensors", "block", "ct-block"
REFUSALS = {  # case: (layout, edit, what the one line says)
    "other quant_method": (
        CT, _qc(lambda qc: qc.update(quant_method="gptq")),
        "quant_method 'gptq' is not supported, expected 'fp8' or 'compressed-tensors'"),
    "other format": (
        CT, _qc(lambda qc: qc.update(format="pack-quantized")),
        "compressed-tensors format 'pack-quantized' is not supported, expected 'float-quantized'"),
    "num_bits 4": (
        CT, _weights(num_bits=4), "config_groups.group_0.weights.num_bits is 4, expected 8 (FP8)"),
    "int weights": (
        CT, _weights(type="int"), "weights.type is 'int', expected 'float'"),
    "group strategy": (
        CT, _weights(strategy="group", group_size=128),
        "weights.strategy 'group' is not supported, expected one of channel, tensor, block"),
    "two config groups": (
        CT, _qc(lambda qc: qc["config_groups"].update(group_1=qc["config_groups"]["group_0"])),
        "2 compressed-tensors config_groups, expected exactly one"),
    "block without structure": (
        CT_BLOCK, _weights(block_structure=None),
        "block_structure is None, expected [rows, cols] of positive integers"),
    "malformed block size": (
        BLOCK, _qc(lambda qc: qc.update(weight_block_size=[128])),
        "weight_block_size is [128], expected [rows, cols] of positive integers"),
    "fp8 block size unlike the scales": (
        BLOCK, _qc(lambda qc: qc.update(weight_block_size=[64, 64])),
        f"tensor {DOWN}_scale_inv has shape [2, 3], expected [4, 6] for its [256, 352] weight (fp8, 64x64 tiles)"),
    "ct block unlike the scales": (
        CT_BLOCK, _weights(block_structure=[64, 32]),
        f"tensor {DOWN}_scale has shape [2, 3], expected [4, 11] for its [256, 352] weight "
        "(compressed-tensors, 64x32 tiles)"),
    "per-tensor declared, per-channel stored": (
        CT, _weights(strategy="tensor"),
        f"tensor {DOWN}_scale has shape [256, 1], expected [1] for its [256, 352] weight "
        "(compressed-tensors, one scale per tensor)"),
    "weight without its scale": (
        CT, _tensors(lambda t: t.pop(UP + "_scale"), index_drop=UP + "_scale"),
        f"tensor {UP} is F8_E4M3 without {UP}_scale, expected one (compressed-tensors, one scale per output channel)"),
    "scale in F64": (
        BLOCK, _tensors(lambda t: t.update({Q + "_scale_inv": t[Q + "_scale_inv"].double()}), holder=Q),
        f"tensor {Q}_scale_inv is F64, expected F32, BF16, F16"),
    "FP8 without quantization_config": (
        CT, _config(lambda c: c.pop("quantization_config")),
        f"tensor {DOWN} is F8_E4M3 but config.json has no quantization_config"),
    "ignored module stored in FP8": (
        CT, _qc(lambda qc: qc["ignore"].append("re:.*q_proj$")),
        f"tensor {Q} is F8_E4M3 but quantization_config keeps {Q[: -len('.weight')]} unquantized, expected BF16"),
    "scales named for the other method": (
        CT, _config(lambda c: c.update(quantization_config={"quant_method": "fp8"})),
        f"tensor {DOWN} is F8_E4M3 without {DOWN}_scale_inv, expected one (fp8, one scale per output row or per "
        "tensor)"),
    "static activation scale": (
        CT, _tensors(lambda t: t.update({Q.replace("weight", "input_scale"): torch.ones(1)}), holder=Q),
        f"tensor {Q.replace('weight', 'input_scale')} is a static activation scale, expected none"),
    "scale of a BF16 weight": (
        CT, _tensors(lambda t: t.update({"lm_head.weight_scale": torch.ones(1)})),
        "tensor lm_head.weight_scale scales lm_head.weight, which is stored as BF16; expected an F8_E4M3 weight"),
}


def _refused(ckpt_factory, tmp_path: Path, case: str) -> tuple[Path, str]:
    layout, edit, needle = REFUSALS[case]
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = clone(ckpt_factory(PRESET, layout), tmp_path / "ck")
    edit(src)
    return src, needle


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_one_line_from_the_cli(ckpt_factory, tmp_path, case):
    src, needle = _refused(ckpt_factory, tmp_path, case)
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(src, out), out, needle)


def test_refusals_come_before_the_output_is_opened(ckpt_factory, tmp_path, monkeypatch):
    """The same refusals from the library, with the writer's open() made to fail the test if reached."""
    def never(self):
        raise AssertionError("the output was opened before the checkpoint was checked")

    monkeypatch.setattr(GGUFWriter, "open", never)
    for i, case in enumerate(REFUSALS):
        src, needle = _refused(ckpt_factory, tmp_path / str(i), case)
        with pytest.raises(SchemeError) as e:
            convert(src, tmp_path / f"{i}.gguf", quant="q4_k_m")
        assert needle in e.value.one_line(), case
    assert not any(p.suffix in (".gguf", ".part") for p in tmp_path.iterdir())


def test_unquantized_checkpoint_has_no_scheme_and_fp8_schemes_read(ckpt_factory):
    assert read_scheme(json.loads((ckpt_factory(PRESET) / "config.json").read_text())) is None
    got = {layout: read_scheme(json.loads((ckpt_factory(PRESET, layout) / "config.json").read_text()))
           for layout in LAYOUTS}
    assert {k: (s.method, s.strategy, s.block) for k, s in got.items()} == {
        k: (lay.method, lay.strategy, lay.block) for k, lay in LAYOUTS.items()}
    assert "lm_head" in got["block"].ignore and "lm_head" in got["ct-block"].ignore
