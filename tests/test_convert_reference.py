"""Our converter against llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python 0.3.36 sdist).

BF16: byte-identical files. Q8_0: the same keys, values, tensors and bytes (our Q8_0 file uses the layout
`llama-quantize` writes, which orders tensors and two keys differently from the converter's own q8_0).

The fixture tokenizer is trained at test time, so its hash is not in convert_hf_to_gguf.py's table of
known pre-tokenizers; the wrapper answers "glm4" for it, the value the table gives every GLM-4.5+ model.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import textwrap

import pytest

from quantize.convert import convert
from quantize.gguf_reader import read_gguf
from tests.llamacpp_src import llamacpp_source

pytest.importorskip("torch")

WRAPPER = textwrap.dedent("""
    import runpy, sys
    root = sys.argv[1]
    sys.path[:0] = [root, root + "/gguf-py"]
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
    sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
    runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
""")


def reference_convert(src, out, outtype: str, *extra: str) -> None:
    root = llamacpp_source()
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(root), str(src), "--outtype", outtype,
                           "--outfile", str(out), *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def named_like_upstream(ckpt, tmp_path, name: str):
    """general.name comes from the directory name in both converters: give them the same one."""
    link = tmp_path / name
    os.symlink(ckpt, link)
    return link


@pytest.mark.slow
@pytest.mark.parametrize("preset,fp8,mtp", [("tiny", None, True), ("air", None, True), ("tiny45", None, True),
                                            ("tiny45", None, False), ("tiny", "block", True),
                                            ("tiny", "compressed-tensors", True)])
def test_bf16_byte_identical_to_convert_hf_to_gguf(ckpt_factory, tmp_path, preset, fp8, mtp):
    src = named_like_upstream(ckpt_factory(preset, fp8), tmp_path, preset)
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    reference_convert(src, ref, "bf16", *([] if mtp else ["--no-mtp"]))
    convert(src, ours, quant="bf16", mtp=mtp)
    assert filecmp.cmp(ours, ref, shallow=False)


@pytest.mark.slow
def test_q8_0_same_content_as_convert_hf_to_gguf(ckpt_factory, tmp_path):
    src = named_like_upstream(ckpt_factory("air"), tmp_path, "air")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    reference_convert(src, ref, "q8_0")
    convert(src, ours, quant="q8_0")
    a, b = read_gguf(ours), read_gguf(ref)
    assert a.metadata == b.metadata and a.types == b.types
    assert sorted((t.name, t.ggml_type, t.shape) for t in a.tensors) == sorted(
        (t.name, t.ggml_type, t.shape) for t in b.tensors)
    for t in b.tensors:
        assert a.tensor_bytes(t.name) == b.tensor_bytes(t.name), t.name
