"""ggml tensor types and a ctypes binding to the quantizer in llama-cpp-python's libggml-base.

The type table is gguf-py's (pure data, usable without the library, e.g. by the GGUF reader). The quantizer is the
real `ggml_quantize_chunk`, so our bytes are exactly llama.cpp's. ctypes releases the GIL during the
call, so a thread pool over row chunks scales with cores. The library opened is the very file libllama
links (quantize.libs), so the quantizer and llama.cpp share one ggml in a process.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantize import libs
from quantize.errors import ToolError

# ggml's type ids and block sizes are gguf-py's (GGMLQuantizationType, GGML_QUANT_SIZES). One entry differs from
# the ggml that llama-cpp-python 0.3.36 bundles: gguf-py 0.19.0 still gives Q8_1 its old f32 scales (40 bytes),
# ggml stores fp16 ones (36). tests/test_quant.py checks every size against libggml.
GGMLType = GGMLQuantizationType
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {**GGML_QUANT_SIZES, GGMLType.Q8_1: (32, 36)}

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
