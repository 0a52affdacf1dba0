"""Header-only index of a sharded safetensors checkpoint, and single-tensor reads to float32.

Only headers are parsed up front; each tensor is read with one positioned read when needed, so memory
holds one tensor (one expert slice) at a time. Supported dtypes: BF16, F16, F32 and FP8 E4M3 scaled as the
checkpoint's config.json declares (quantize.fp8: per tile of any size, per channel or per tensor); every FP8
tensor is checked against that scheme when the checkpoint is opened, before anything is written. FP8 weights are
dequantized in F32 and rounded once to BF16, exactly like llama.cpp's converter does.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantize.errors import ConversionError
from quantize.fp8 import Fp8Scheme, check_tensors, dequantize_rows

_ELEM_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F64": 8, "I64": 8, "I32": 4, "U8": 1}
SUPPORTED = ("BF16", "F16", "F32", "F8_E4M3")
# Scale tensors kept decoded: every chunk of an FP8 weight needs its whole scale grid, and the chunks of the few
# weights in flight are spread over the worker threads. A grid is small (a few KiB per 128x128-tiled expert).
SCALE_CACHE = 64


class MissingShardError(ConversionError):
    def __init__(self, path: Path, tensor: str | None = None):
        what = f" (holds {tensor})" if tensor else ""
        super().__init__(f"missing checkpoint shard {path}{what}", hint="re-download the checkpoint")
        self.path = path


class TruncatedFileError(ConversionError):
    def __init__(self, path: Path, expected: int, actual: int):
        super().__init__(f"{path} is truncated: {actual} bytes, header says {expected}",
                         hint="re-download this shard")
        self.path, self.expected, self.actual = path, expected, actual


class UnsupportedDtypeError(ConversionError):
    def __init__(self, name: str, dtype: str):
        super().__init__(f"tensor {name} has unsupported dtype {dtype} (supported: {', '.join(SUPPORTED)})")
        self.name, self.dtype = name, dtype


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives. `shape` is the PyTorch (row-major) shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the data
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise TruncatedFileError(path, 8, size)
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20 or n + 8 > size:
                raise TruncatedFileError(path, n + 8, size)
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise MissingShardError(path) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not a safetensors file (bad header)") from e
    return header, 8 + n


def index_shard(path: Path) -> dict[str, TensorEntry]:
    """Parse one shard's header; checks that every tensor's bytes are present and dtypes known."""
    header, base = _read_header(path)
    size = path.stat().st_size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: malformed safetensors header entry for {name}") from e
        n = int(np.prod(shape, dtype=np.int64)) * _ELEM_SIZE.get(dtype, 0)
        if dtype not in _ELEM_SIZE:
            raise UnsupportedDtypeError(name, dtype)
        if end - begin != n:
            raise ConversionError(f"{path}: tensor {name} has inconsistent size in its header")
        if base + end > size:
            raise TruncatedFileError(path, base + end, size)
        out[name] = TensorEntry(name, path, dtype, shape, base + begin, n)
    return out


class Checkpoint:
    """All tensors of a checkpoint directory, by name (headers only).

    `scheme`: the FP8 scheme its config.json declares (quantize.fp8.read_scheme), None when it declares none;
    every FP8 weight and scale is checked against it here (SchemeError), so a conversion fails before writing."""

    def __init__(self, src_dir: str | Path, scheme: Fp8Scheme | None = None):
        self.dir = Path(src_dir)
        self.shards = self._shard_files()
        self.entries: dict[str, TensorEntry] = {}
        for shard in self.shards:
            self.entries.update(index_shard(shard))
        self._check_index()
        self.tilings = check_tensors(scheme, {n: (e.dtype, e.shape) for n, e in self.entries.items()})
        self._scales: OrderedDict[str, np.ndarray] = OrderedDict()  # scale name -> F32 grid, least recent first
        self._scales_lock = threading.Lock()

    def _shard_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index} is malformed") from e
            files = sorted(set(self.weight_map.values()))
            for f in files:
                if not (self.dir / f).exists():
                    holder = next(k for k, v in self.weight_map.items() if v == f)
                    raise MissingShardError(self.dir / f, holder)
            return [self.dir / f for f in files]
        self.weight_map = None
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no .safetensors files in {self.dir}")
        return files

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for name, fname in self.weight_map.items():
            if name not in self.entries:
                raise ConversionError(f"tensor {name} listed in the index is missing from {fname}")

    def names(self) -> list[str]:
        return list(self.entries)

    def file_order(self) -> list[str]:
        """Names in the order llama.cpp's converter visits them: shards sorted, names sorted per shard."""
        by_shard: dict[Path, list[str]] = {}
        for e in self.entries.values():
            by_shard.setdefault(e.path, []).append(e.name)
        return [n for shard in self.shards for n in sorted(by_shard.get(shard, []))]

    def read_raw(self, name: str) -> np.ndarray:
        """Stored bytes of a tensor as a uint8 array."""
        e = self.entries[name]
        buf = np.empty(e.nbytes, dtype=np.uint8)
        with open(e.path, "rb") as f:
            f.seek(e.start)
            n = f.readinto(memoryview(buf))
        if n != e.nbytes:
            raise TruncatedFileError(e.path, e.start + e.nbytes, os.path.getsize(e.path))
        return buf

    def row_align(self, name: str) -> int:
        """Rows a piece of this tensor should start at a multiple of: an FP8 weight's tile height (so a slab
        covers whole rows of its scale grid), 1 otherwise."""
        tiling = self.tilings.get(name)
        return tiling.rows if tiling is not None and tiling.rows < self.entries[name].shape[0] else 1

    def n_rows(self, name: str) -> int:
        """Rows of a stored tensor seen as 2-D (1-D tensors are one row)."""
        shape = self.entries[name].shape
        return int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1

    def read_rows_f32(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a tensor as float32 (n, row_len); FP8 dequantized and rounded to BF16.
        Lets large tensors (embeddings: 3 GB in F32 for GLM-4.6) stream in bounded slabs."""
        e = self.entries[name]
        if e.dtype not in SUPPORTED:
            raise UnsupportedDtypeError(name, e.dtype)
        ncols = e.shape[-1] if e.shape else 1
        buf = np.empty((r1 - r0) * ncols * _ELEM_SIZE[e.dtype], dtype=np.uint8)
        self.read_rows_into(name, r0, r1, buf)
        if e.dtype == "BF16":
            return bf16_bits_to_f32(buf.view(np.uint16)).reshape(-1, ncols)
        if e.dtype == "F16":
            return buf.view(np.float16).astype(np.float32).reshape(-1, ncols)
        if e.dtype == "F32":
            return buf.view(np.float32).reshape(-1, ncols)
        return self._dequant_fp8(name, buf.reshape(-1, ncols), r0)

    def read_rows_into(self, name: str, r0: int, r1: int, out: np.ndarray) -> None:
        """Stored bytes of rows [r0, r1) into `out`, a contiguous array of exactly that many bytes.

        One unbuffered positioned read that releases the GIL, so worker threads can read in parallel
        into buffers they reuse."""
        e = self.entries[name]
        ncols = e.shape[-1] if e.shape else 1
        row_bytes = ncols * _ELEM_SIZE[e.dtype]
        if out.nbytes != (r1 - r0) * row_bytes:
            raise ValueError(f"buffer of {out.nbytes} bytes for {r1 - r0} rows of {row_bytes} bytes")
        view = memoryview(out).cast("B")
        with open(e.path, "rb", buffering=0) as f:
            f.seek(e.start + r0 * row_bytes)
            got = 0
            while got < out.nbytes:  # a raw read may return less than asked
                n = f.readinto(view[got:])
                if not n:
                    raise TruncatedFileError(e.path, e.start + e.nbytes, os.path.getsize(e.path))
                got += n

    def read_bf16_bits(self, name: str) -> np.ndarray:
        """A tensor as BF16 bit patterns (uint16, torch shape): what llama.cpp's converter stores for a
        BF16 outtype. FP8 weights are dequantized then rounded to BF16."""
        e = self.entries[name]
        if e.dtype == "BF16":
            return self.read_raw(name).view(np.uint16).reshape(e.shape)
        return f32_to_bf16_bits(self.read_f32(name))

    def read_f32(self, name: str) -> np.ndarray:
        """A tensor as float32 (torch shape). FP8 weights are dequantized and rounded to BF16 first."""
        e = self.entries[name]
        if e.dtype not in SUPPORTED:
            raise UnsupportedDtypeError(name, e.dtype)
        raw = self.read_raw(name)
        if e.dtype == "BF16":
            return bf16_bits_to_f32(raw.view(np.uint16)).reshape(e.shape)
        if e.dtype == "F16":
            return raw.view(np.float16).astype(np.float32).reshape(e.shape)
        if e.dtype == "F32":
            return raw.view(np.float32).reshape(e.shape)
        return self._dequant_fp8(name, raw.view(np.uint8).reshape(e.shape), 0)

    def _dequant_fp8(self, name: str, q: np.ndarray, r0: int) -> np.ndarray:
        """Dequantize FP8 rows starting at row r0: F32 product with their tiles' scales, then one BF16 rounding."""
        tiling = self.tilings[name]
        return bf16_bits_to_f32(f32_to_bf16_bits(dequantize_rows(q, self._scale_grid(name), tiling, r0)))

    def _scale_grid(self, name: str) -> np.ndarray:
        """An FP8 weight's scales as F32 in their tile grid (read-only), read once for all its chunks."""
        tiling, shape = self.tilings[name], self.entries[name].shape
        with self._scales_lock:  # held over the read, so threads converting chunks of one weight read it once
            grid = self._scales.get(tiling.scale)
            if grid is not None:
                self._scales.move_to_end(tiling.scale)
                return grid
            grid = self.read_f32(tiling.scale).reshape(tiling.scale_grid((shape[0], shape[1])))
            grid.flags.writeable = False
            self._scales[tiling.scale] = grid
            if len(self._scales) > SCALE_CACHE:
                self._scales.popitem(last=False)
            return grid


def bf16_bits_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact BF16 -> F32: the bits shifted into the high half (one pass, no uint32 temporary).
    `out`: optional float32 array of bits' size to decode into."""
    if out is None:
        return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (torch's `.to(torch.bfloat16)`), NaN kept quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded
