"""quantize.ggml: the ctypes binding to libggml-base's quantizer."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from quantize import ggml
from quantize.ggml import GGMLType as T

pytest.importorskip("llama_cpp")

TYPES = [T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.Q5_K, T.Q4_0]


@pytest.mark.parametrize("t", list(ggml.BLOCK_SIZES))
def test_block_table_matches_library(t):
    blck, size = ggml.BLOCK_SIZES[t]
    assert ggml.lib_blck_size(t) == blck and ggml.lib_type_size(t) == size
    assert ggml.row_size(t, blck * 8) == ggml.lib_row_size(t, blck * 8)


@pytest.mark.parametrize("t", TYPES)
def test_threaded_chunks_equal_one_library_call(t):
    """Splitting rows over threads gives exactly the bytes of one ggml_quantize_chunk over the matrix."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 512), dtype=np.float32) * 0.02
    with ggml.Quantizer(threads=4) as q:
        ours = q.quantize(t, x)
    ref = np.empty(ggml.row_size(t, 512) * 300, dtype=np.uint8)
    lib = ggml._lib()
    n = lib.ggml_quantize_chunk(int(t), x.ctypes.data, ref.ctypes.data, 0, 300, 512, None)
    assert n == ref.nbytes
    assert ours.tobytes() == ref.tobytes()
    assert ggml.validate_row_data(t, ours)


def test_q8_0_values_follow_ggml_reference():
    """Q8_0 block = fp16 d = amax/127 then int8 round(x/d): check one block by hand."""
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
    with ggml.Quantizer(threads=1) as q:
        b = q.quantize(T.Q8_0, x)
    d = np.frombuffer(b[:2].tobytes(), dtype=np.float16)[0]
    qs = np.frombuffer(b[2:].tobytes(), dtype=np.int8)
    assert d == np.float16(1 / 127)
    assert np.array_equal(qs, np.round(x[0] / np.float32(d)).clip(-127, 127).astype(np.int8))


def test_validate_rejects_nan_scale():
    block = np.zeros(34, dtype=np.uint8)
    block[:2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
    assert not ggml.validate_row_data(T.Q8_0, block)


def test_row_size_rejects_partial_blocks():
    with pytest.raises(ValueError):
        ggml.row_size(T.Q4_K, 352)
    assert ctypes.sizeof(ctypes.c_size_t) == 8


def test_chunks_never_cross_a_matrix_boundary(monkeypatch):
    """With stacked experts, every ggml_quantize_chunk call stays inside one expert's rows."""
    x = np.random.default_rng(1).standard_normal((3 * 100, 256), dtype=np.float32)
    with ggml.Quantizer(threads=1) as q:
        whole = q.quantize(T.Q4_K, x)
    calls = []
    lib = ggml._lib()

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def ggml_quantize_chunk(self, t, src, dst, start, nrows, n_per_row, imatrix):
            calls.append(((src - x.ctypes.data) // (256 * 4), nrows))
            return lib.ggml_quantize_chunk(t, src, dst, start, nrows, n_per_row, imatrix)

    monkeypatch.setattr(ggml, "_lib", lambda: Spy())
    with ggml.Quantizer(threads=2) as q:
        stacked = q.quantize(T.Q4_K, x, rows_per_matrix=100)
    assert stacked.tobytes() == whole.tobytes()
    assert sum(n for _, n in calls) == 300
    assert all(start // 100 == (start + n - 1) // 100 for start, n in calls), calls
    with pytest.raises(ValueError):
        ggml.Quantizer(threads=1).quantize(T.Q4_K, x, rows_per_matrix=128)
