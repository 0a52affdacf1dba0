"""GGUF reader and streaming writer, checked against gguf-py's GGUFReader (llama.cpp's Python GGUF library, the
installed `gguf` package): an independent reader of what our writer streams, and of what our reader parses."""

from __future__ import annotations

import io

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from quantize.ggml import GGMLType
from quantize.gguf_reader import GGUFFormatError, GGUFTruncated, read_gguf, read_header
from quantize.writer import GGUFWriter


def test_reader_agrees_with_gguf_py(gguf_factory):
    path = gguf_factory("air", "q4_k_m")
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    ref_kv = {f.name: f.contents() for f in ref.fields.values() if not f.name.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_kv)
    for k, v in ref_kv.items():
        assert ours.metadata[k] == pytest.approx(v) if isinstance(v, float) else ours.metadata[k] == v, k
    assert [(t.name, t.ggml_type, t.shape, t.nbytes) for t in ours.tensors] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in ref.tensors]
    for t in ref.tensors[:12]:
        assert ours.tensor_bytes(t.name) == t.data.tobytes()
    assert ours.data_offset == ref.data_offset


def test_writer_output_readable_by_gguf_py(tmp_path):
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
    r = gguf.GGUFReader(tmp_path / "x.gguf")
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


SCALARS = {GGUFValueType.UINT8: 200, GGUFValueType.INT8: -100, GGUFValueType.UINT16: 60000,
           GGUFValueType.INT16: -30000, GGUFValueType.UINT32: 4_000_000_000, GGUFValueType.INT32: -2_000_000_000,
           GGUFValueType.FLOAT32: 0.1, GGUFValueType.UINT64: 2**63 + 5, GGUFValueType.INT64: -(2**62),
           GGUFValueType.FLOAT64: 0.1, GGUFValueType.BOOL: True, GGUFValueType.STRING: "glm ✓"}


def _write_every_kind(path, rng) -> dict[str, np.ndarray]:
    """A GGUF with a key of every value type, arrays of several item types, and F32 / BF16 / Q8_0 / Q4_K tensors
    streamed in slices (the 3-D one expert by expert). Returns the bytes written per tensor."""
    from quantize.ggml import Quantizer

    w = GGUFWriter(path)
    for vt, value in SCALARS.items():
        w.add_kv(f"s.{vt.name.lower()}", vt, value)
    w.add_array("a.u8", GGUFValueType.UINT8, [0, 255, 7])
    w.add_array("a.i64", GGUFValueType.INT64, [-1, 2**40])
    w.add_array("a.f32", GGUFValueType.FLOAT32, [0.5, -2.25])
    w.add_array("a.bool", GGUFValueType.BOOL, [True, False])
    w.add_array("a.str", GGUFValueType.STRING, ["x", "", "ü"])
    with Quantizer(threads=1) as q:
        data = {"f32": rng.standard_normal((3, 40), dtype=np.float32),
                "bf16": (rng.standard_normal((2, 64), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16),
                "q8": q.quantize(GGMLType.Q8_0, rng.standard_normal((4, 64), dtype=np.float32)),
                "exps": q.quantize(GGMLType.Q4_K, rng.standard_normal((3 * 5, 256), dtype=np.float32),
                                   rows_per_matrix=5)}
    specs = {"f32": ((40, 3), GGMLType.F32), "bf16": ((64, 2), GGMLType.BF16), "q8": ((64, 4), GGMLType.Q8_0),
             "exps": ((256, 5, 3), GGMLType.Q4_K)}
    for name, (shape, t) in specs.items():
        w.add_tensor_info(name, shape, t)
    with w:
        for name, arr in data.items():
            raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
            for piece in np.array_split(raw, 3):  # in slices, as the converter streams experts
                w.write_tensor_data(name, piece)
    return {name: np.ascontiguousarray(arr).view(np.uint8).reshape(-1) for name, arr in data.items()}


def test_streamed_writer_read_back_by_gguf_py_and_by_our_reader(tmp_path):
    path = tmp_path / "every.gguf"
    written = _write_every_kind(path, np.random.default_rng(3))
    ref, ours = gguf.GGUFReader(path), read_gguf(path)
    fields = {f.name: f for f in ref.fields.values() if not f.name.startswith("GGUF.")}
    assert list(fields) == list(ours.metadata)
    for vt, value in SCALARS.items():
        key = f"s.{vt.name.lower()}"
        assert fields[key].types == [vt] and ours.types[key] == vt
        got = fields[key].contents()
        assert got == (pytest.approx(value) if vt == GGUFValueType.FLOAT32 else value), key
        assert ours.metadata[key] == got, key
    for key in ("a.u8", "a.i64", "a.f32", "a.bool", "a.str"):
        assert ours.metadata[key] == fields[key].contents(), key
        assert ours.types[key] == (GGUFValueType.ARRAY, fields[key].types[1]), key
    assert [(t.name, t.ggml_type, t.shape, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data_offset - ref.data_offset, t.n_bytes)
        for t in ref.tensors]
    assert ours.data_offset == ref.data_offset
    for t in ref.tensors:
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(raw, written[t.name]), t.name
        assert ours.tensor_bytes(t.name) == written[t.name].tobytes(), t.name


def test_read_header_from_bytes_file_objects_and_a_header_kept_apart(tmp_path):
    path = tmp_path / "every.gguf"
    _write_every_kind(path, np.random.default_rng(4))
    whole = path.read_bytes()
    full = read_gguf(path)
    head = whole[:full.data_offset]
    from_bytes = read_header(head, label="mem")
    assert from_bytes.data_offset == len(head) and from_bytes.tensors == full.tensors
    assert from_bytes.metadata == full.metadata and from_bytes.types == full.types
    f = io.BytesIO(b"junk" + whole)
    f.seek(4)  # read from the current position: offsets are relative to it
    assert read_header(f, label="at 4").data_offset == full.data_offset
    # the header alone on disk, the original size given: what the remote-header cache keeps
    (tmp_path / "head.gguf").write_bytes(head)
    alone = read_gguf(tmp_path / "head.gguf", size=len(whole))
    assert alone.tensors == full.tensors and alone.data_offset == full.data_offset
    with pytest.raises(GGUFFormatError, match="truncated .tensor f32 extends past end of file") as exc:
        read_gguf(tmp_path / "head.gguf")  # its own size: the data is not there
    assert not isinstance(exc.value, GGUFTruncated)
    last = full.tensors[-1]
    read_header(head, label="mem", size=full.data_offset + last.offset + last.nbytes)
    with pytest.raises(GGUFFormatError, match="mem: truncated .tensor exps"):
        read_header(head, label="mem", size=full.data_offset + last.offset + last.nbytes - 1)


def test_read_header_tells_short_bytes_from_corrupt_ones(tmp_path):
    path = tmp_path / "every.gguf"
    _write_every_kind(path, np.random.default_rng(5))
    head = path.read_bytes()[:read_gguf(path).data_offset]
    end_of_infos = len(head.rstrip(b"\0"))  # the padding after the tensor infos is not needed to parse
    for n in range(0, end_of_infos, 7):
        with pytest.raises(GGUFTruncated, match="x: truncated GGUF header"):
            read_header(head[:n], label="x")
    bad = bytearray(head)
    bad[24 + 8 + len(b"s.uint8")] = 0xEE  # the first key's value type
    with pytest.raises(GGUFFormatError, match="x: unknown value type 238 for key s.uint8") as exc:
        read_header(bytes(bad), label="x")
    assert not isinstance(exc.value, GGUFTruncated)
    with pytest.raises(GGUFFormatError, match="x is not a GGUF file"):
        read_header(b"GGML" + head[4:], label="x")
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version 9"):
        read_header(head[:4] + b"\x09\0\0\0" + head[8:], label="x")
