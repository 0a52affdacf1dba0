"""ggml tensor types and a ctypes binding to the quantizer in llama-cpp-python's libggml-base.

The type table is pure data (usable without the library, e.g. by the GGUF reader). The quantizer is the
real `ggml_quantize_chunk`, so our bytes are exactly llama.cpp's. ctypes releases the GIL during the
call, so a thread pool over row chunks scales with cores. The library opened is the very file libllama
links (quantize.libs), so the quantizer and llama.cpp share one ggml in a process.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from pathlib import Path

import numpy as np

from quantize import libs
from quantize.errors import ToolError


class GGMLType(IntEnum):
    """ggml_type values (ggml/include/ggml.h)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


QK_K = 256

# (elements per block, bytes per block), as in ggml-common.h / gguf-py GGML_QUANT_SIZES.
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8), GGMLType.IQ1_M: (256, 56), GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17), GGMLType.NVFP4: (64, 36), GGMLType.Q1_0: (128, 18), GGMLType.Q2_0: (64, 18),
}

# Minimum elements per worker chunk, as llama.cpp's llama_tensor_quantize_impl uses.
MIN_CHUNK_ELEMENTS = 32 * 512


class QuantizerUnavailable(ToolError):
    """libggml-base from llama-cpp-python could not be loaded."""


def row_size(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` elements (n_per_row must be a multiple of the block size)."""
    blck, tsize = BLOCK_SIZES[GGMLType(ggml_type)]
    if n_per_row % blck:
        raise ValueError(f"row of {n_per_row} is not a multiple of {GGMLType(ggml_type).name} block {blck}")
    return n_per_row // blck * tsize


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor with ggml shape (ne0, ne1, ...)."""
    n_rows = 1
    for d in shape[1:]:
        n_rows *= int(d)
    return row_size(ggml_type, int(shape[0])) * n_rows


def is_quantized(ggml_type: int) -> bool:
    return BLOCK_SIZES[GGMLType(ggml_type)][0] > 1


def lib_dir() -> Path:
    """Directory holding llama-cpp-python's shared libraries (found without importing llama_cpp)."""
    path = libs.lib_dir()
    if path is None:
        raise QuantizerUnavailable("llama-cpp-python is not installed", hint="pip install llama-cpp-python==0.3.36")
    return path


def lib_path() -> Path:
    """The libggml-base file the quantizer opens: the one libllama links, so there is one ggml per process."""
    return libs.lib_path("ggml-base", lib_dir())


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    path = lib_path()
    if not path.exists():
        raise QuantizerUnavailable(f"{path} not found", hint="reinstall llama-cpp-python==0.3.36")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    return lib


def lib_row_size(ggml_type: int, n_per_row: int) -> int:
    """ggml_row_size from the library (used to cross-check BLOCK_SIZES)."""
    return int(_lib().ggml_row_size(int(ggml_type), int(n_per_row)))


def lib_type_size(ggml_type: int) -> int:
    return int(_lib().ggml_type_size(int(ggml_type)))


def lib_blck_size(ggml_type: int) -> int:
    return int(_lib().ggml_blck_size(int(ggml_type)))


def validate_row_data(ggml_type: int, data: bytes | np.ndarray) -> bool:
    """ggml_validate_row_data: False on NaN/inf scales or malformed blocks."""
    buf = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data)
    return bool(_lib().ggml_validate_row_data(int(ggml_type), buf.ctypes.data, buf.nbytes))


@dataclass
class Quantizer:
    """Quantizes f32 matrices with ggml's own code, splitting rows over a thread pool.

    Chunks are whole rows, at least MIN_CHUNK_ELEMENTS each, and never cross a matrix (expert) boundary
    because callers pass one expert slice at a time.
    """

    threads: int = 0

    def __post_init__(self) -> None:
        self.threads = self.threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Quantizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quantize(self, ggml_type: int, x: np.ndarray, rows_per_matrix: int | None = None) -> np.ndarray:
        """Quantize a 2-D f32 array (rows, n_per_row) to a uint8 array of row_size*rows bytes.

        rows_per_matrix: x stacks several matrices (experts) of this many rows; no chunk crosses one
        (as in llama.cpp, where each expert may have its own imatrix slice)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_rows, n_per_row = x.shape
        out = np.empty(n_rows * row_size(ggml_type, n_per_row), dtype=np.uint8)
        prepare(ggml_type)
        per = rows_per_matrix or n_rows
        if n_rows % per:
            raise ValueError(f"{n_rows} rows is not a whole number of {per}-row matrices")
        # whole rows, at least MIN_CHUNK_ELEMENTS, about 8 tasks per thread (few Python round trips, balanced)
        step = max(-(-MIN_CHUNK_ELEMENTS // n_per_row), -(-n_rows // (self.threads * 8)))
        chunks = [(s, min(step, m + per - s)) for m in range(0, n_rows, per) for s in range(m, m + per, step)]
        rsize = row_size(ggml_type, n_per_row)

        def work(chunk: tuple[int, int]) -> None:
            start, nrows = chunk
            quantize_into(ggml_type, x[start:start + nrows], out[start * rsize:(start + nrows) * rsize])

        if self._pool is None or len(chunks) == 1:
            for c in chunks:
                work(c)
        else:
            list(self._pool.map(work, chunks))
        return out


def prepare(ggml_type: int) -> None:
    """Check that `ggml_type` needs no importance matrix and run ggml_quantize_init for it (once per type,
    before worker threads call quantize_into)."""
    lib = _lib()
    if lib.ggml_quantize_requires_imatrix(int(ggml_type)):
        raise ValueError(f"{GGMLType(ggml_type).name} requires an importance matrix")
    lib.ggml_quantize_init(int(ggml_type))


def quantize_into(ggml_type: int, x: np.ndarray, out: np.ndarray) -> None:
    """Quantize the rows of a C-contiguous f32 array (rows, n_per_row) into `out` (uint8, exactly
    rows * row_size bytes) in the calling thread, then validate them as llama_model_quantize does.

    ctypes releases the GIL for the call, so several threads can quantize disjoint row ranges at once.
    Call prepare(ggml_type) first."""
    lib = _lib()
    n_rows, n_per_row = x.shape
    if x.dtype != np.float32 or not x.flags.c_contiguous or not out.flags.c_contiguous:
        raise ValueError("quantize_into needs C-contiguous float32 rows and a contiguous output")
    if out.nbytes != n_rows * row_size(ggml_type, n_per_row):
        raise ValueError(f"output holds {out.nbytes} bytes, {GGMLType(ggml_type).name} rows need "
                         f"{n_rows * row_size(ggml_type, n_per_row)}")
    # ggml_quantize_chunk's `start` is an element offset into src/dst; we pass pre-offset pointers.
    n = lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if not lib.ggml_validate_row_data(int(ggml_type), out.ctypes.data, n):
        raise ValueError(f"quantized {GGMLType(ggml_type).name} data failed validation")
