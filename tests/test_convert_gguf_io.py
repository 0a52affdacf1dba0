"""GGUF reader and streaming writer, checked against gguf-py (llama.cpp's Python GGUF library)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from quantize.ggml import GGMLType
from quantize.gguf_reader import GGUFFormatError, GGUFValueType, read_gguf
from quantize.writer import GGUFWriter
from tests.llamacpp_src import llamacpp_source


@pytest.fixture(scope="module")
def gguf_py():
    sys.path.insert(0, str(llamacpp_source() / "gguf-py"))
    try:
        import gguf

        yield gguf
    finally:
        sys.path.pop(0)


def test_reader_agrees_with_gguf_py(gguf_factory, gguf_py):
    path = gguf_factory("air", "q4_k_m")
    ours, ref = read_gguf(path), gguf_py.GGUFReader(path)
    ref_kv = {f.name: f.contents() for f in ref.fields.values() if not f.name.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_kv)
    for k, v in ref_kv.items():
        assert ours.metadata[k] == pytest.approx(v) if isinstance(v, float) else ours.metadata[k] == v, k
    assert [(t.name, t.ggml_type, t.shape, t.nbytes) for t in ours.tensors] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in ref.tensors]
    for t in ref.tensors[:12]:
        assert ours.tensor_bytes(t.name) == t.data.tobytes()
    assert ours.data_offset == ref.data_offset


def test_writer_output_readable_by_gguf_py(tmp_path, gguf_py):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_string("general.architecture", "test")
    w.add_u32("n", 7)
    w.add_f32("f", 0.5)
    w.add_bool("b", True)
    w.add_array("arr", GGUFValueType.STRING, ["a", "bé", ""])
    w.add_array("ints", GGUFValueType.INT32, [1, -2, 3])
    a = np.arange(64 * 3, dtype=np.float32).reshape(3, 64)
    w.add_tensor_info("a.weight", (64, 3), GGMLType.F32)
    w.add_tensor_info("b", (5,), GGMLType.F32)
    with w:
        w.write_tensor_data("a.weight", a[:1])  # in pieces, like expert slices
        w.write_tensor_data("a.weight", a[1:])
        w.write_tensor_data("b", np.ones(5, dtype=np.float32))
    r = gguf_py.GGUFReader(tmp_path / "x.gguf")
    assert r.fields["arr"].contents() == ["a", "bé", ""] and r.fields["ints"].contents() == [1, -2, 3]
    assert r.fields["n"].contents() == 7 and r.fields["b"].contents() is True
    assert np.array_equal(r.tensors[0].data, a) and list(r.tensors[1].data) == [1.0] * 5
    assert not (tmp_path / "x.gguf.part").exists()


def test_writer_refuses_incomplete_or_out_of_order_data(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_tensor_info("a", (32,), GGMLType.F32)
    w.add_tensor_info("b", (32,), GGMLType.F32)
    with pytest.raises(RuntimeError, match="out of order"):
        with w:
            w.write_tensor_data("b", np.zeros(32, dtype=np.float32))
    assert list(tmp_path.iterdir()) == []
    w2 = GGUFWriter(tmp_path / "y.gguf")
    w2.add_tensor_info("a", (32,), GGMLType.F32)
    with pytest.raises(RuntimeError, match="not fully written"):
        with w2:
            w2.write_tensor_data("a", np.zeros(16, dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_truncated_and_foreign_files(gguf_factory, tmp_path):
    data = gguf_factory("tiny", "q8_0").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf(tmp_path / "t.gguf")
    (tmp_path / "h.gguf").write_bytes(data[:100])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf(tmp_path / "h.gguf")
    (tmp_path / "n.gguf").write_bytes(b"PK\x03\x04" + data[4:200])
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        read_gguf(tmp_path / "n.gguf")
