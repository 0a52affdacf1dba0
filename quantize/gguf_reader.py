"""Header-only GGUF reader: metadata and tensor infos without reading tensor data.

`read_gguf(path)` parses the header (a few MB at most even for 355B models: the tokenizer dominates) and
returns a `GGUFFile`. `GGUFFile.tensor_bytes(name)` reads one tensor's raw bytes on demand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

from quantize.errors import InputError
from quantize.ggml import BLOCK_SIZES, GGMLType, tensor_nbytes

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class GGUFFormatError(InputError):
    """The file is not a readable GGUF (bad magic, truncated header, unknown type)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. `shape` is in ggml order (ne0 = row length first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # relative to the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """Parsed header. `metadata` maps key -> Python value; `types` maps key -> GGUFValueType
    (for arrays: (ARRAY, item type))."""

    path: Path
    version: int
    metadata: dict[str, Any]
    types: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def tensor_bytes(self, name: str) -> bytes:
        """Raw on-disk bytes of one tensor."""
        t = self._by_name[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + t.offset)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise GGUFFormatError(f"{self.path}: tensor {name} is truncated")
        return data

    def tensor_array(self, name: str):
        """One tensor as a numpy array in torch order (reversed ggml shape); raw uint8 rows if quantized."""
        import numpy as np

        t = self._by_name[name]
        raw = self.tensor_bytes(name)
        np_types = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}
        if t.ggml_type in np_types:
            return np.frombuffer(raw, dtype=np_types[t.ggml_type]).reshape(t.shape[::-1])
        if t.ggml_type == GGMLType.BF16:
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            return u.view(np.float32).reshape(t.shape[::-1])
        return np.frombuffer(raw, dtype=np.uint8).reshape(*t.shape[:0:-1], -1)


class _Cursor:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header")
        return b

    def scalar(self, vtype: GGUFValueType):
        fmt = SCALAR_FMT[vtype]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(GGUFValueType.UINT64)
        if n > 1 << 30:
            raise GGUFFormatError(f"{self.path}: implausible string length {n}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> tuple[Any, Any]:
        if vtype == GGUFValueType.STRING:
            return self.string(), vtype
        if vtype == GGUFValueType.ARRAY:
            itype = GGUFValueType(self.scalar(GGUFValueType.UINT32))
            n = self.scalar(GGUFValueType.UINT64)
            return self.array(itype, n), (GGUFValueType.ARRAY, itype)
        return self.scalar(vtype), vtype

    def array(self, itype: GGUFValueType, n: int) -> list:
        if itype in SCALAR_FMT:
            fmt = SCALAR_FMT[itype]
            size = struct.calcsize(fmt)
            return list(struct.unpack(f"<{n}{fmt[1]}", self.read(size * n)))
        return [self.value(itype)[0] for _ in range(n)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF header (v2/v3). Raises GGUFFormatError on anything malformed."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot open {path}: {e.strerror}") from e
    with f:
        cur = _Cursor(f, path)
        if cur.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
        version = cur.scalar(GGUFValueType.UINT32)
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors = cur.scalar(GGUFValueType.UINT64)
        n_kv = cur.scalar(GGUFValueType.UINT64)
        metadata, types = _read_kv(cur, n_kv)
        raw_infos = [_read_tensor_info(cur) for _ in range(n_tensors)]
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        pos = f.tell()
        data_offset = pos + (-pos % alignment)
        size = f.seek(0, 2)
    tensors = [TensorInfo(n, t, s, o, tensor_nbytes(t, s)) for n, t, s, o in raw_infos]
    for t in tensors:
        if data_offset + t.offset + t.nbytes > size:
            raise GGUFFormatError(f"{path}: truncated (tensor {t.name} extends past end of file)")
    return GGUFFile(path, version, metadata, types, tensors, alignment, data_offset)


def _read_kv(cur: _Cursor, n_kv: int) -> tuple[dict, dict]:
    metadata: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        try:
            vtype = GGUFValueType(cur.scalar(GGUFValueType.UINT32))
        except ValueError as e:
            raise GGUFFormatError(f"{cur.path}: unknown value type for key {key}") from e
        metadata[key], types[key] = cur.value(vtype)
    return metadata, types


def _read_tensor_info(cur: _Cursor) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string()
    n_dims = cur.scalar(GGUFValueType.UINT32)
    if n_dims > 4:
        raise GGUFFormatError(f"{cur.path}: tensor {name} has {n_dims} dims")
    shape = tuple(cur.scalar(GGUFValueType.UINT64) for _ in range(n_dims))
    ggml_type = cur.scalar(GGUFValueType.UINT32)
    if ggml_type not in {int(t) for t in BLOCK_SIZES}:
        raise GGUFFormatError(f"{cur.path}: tensor {name} has unknown ggml type {ggml_type}")
    offset = cur.scalar(GGUFValueType.UINT64)
    return name, ggml_type, shape, offset
