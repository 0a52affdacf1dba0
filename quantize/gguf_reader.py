"""Header-only GGUF reader: metadata and tensor infos without reading tensor data.

`read_header(src, label=...)` parses a header from bytes or a binary file object (a few MB at most even for 355B
models: the tokenizer dominates) and returns a `GGUFHeader`; bytes that end inside the header raise
`GGUFTruncated`, so a caller reading a remote file knows to fetch more. `read_gguf(path)` does the same for a
file and returns a `GGUFFile`, whose `tensor_bytes(name)` reads one tensor's raw bytes on demand. `size` (both)
is the size of the whole file, for a header kept apart from its data.

The format's constants (magic, value types, alignment, scalar encodings) are gguf-py's.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFReader, GGUFValueType

from quantize.errors import InputError
from quantize.ggml import BLOCK_SIZES, GGMLType, tensor_nbytes

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
VERSIONS = (2, 3)
# numpy dtype of each fixed-size value type, as gguf-py's reader decodes them (the file is little-endian)
SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    vt: np.dtype(t).newbyteorder("<") for vt, t in GGUFReader.gguf_scalar_to_np.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")  # counts, lengths and type ids: fixed by the format
_MAX_ITEMS = 1 << 30  # longer strings or arrays mean a corrupt header, not a real one
_KNOWN_TYPES = frozenset(int(t) for t in BLOCK_SIZES)


class GGUFFormatError(InputError):
    """The file is not a readable GGUF (bad magic, truncated header, unknown type)."""


class GGUFTruncated(GGUFFormatError):
    """The bytes end inside the header: not corrupt (as far as they go), just short."""


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
class GGUFHeader:
    """A parsed header. `metadata` maps key -> Python value; `types` maps key -> GGUFValueType (for arrays:
    (ARRAY, item type)). `data_offset` is the header's length: where the (aligned) data section starts."""

    version: int
    metadata: dict[str, Any]
    types: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


@dataclass
class GGUFFile(GGUFHeader):
    """The header of the GGUF at `path`, with its tensors' data readable on demand."""

    path: Path

    def tensor_bytes(self, name: str) -> bytes:
        """Raw on-disk bytes of one tensor."""
        t = self._by_name[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + t.offset)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise GGUFFormatError(f"{self.path}: tensor {name} is truncated")
        return data

    def tensor_array(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in torch order (reversed ggml shape); raw uint8 rows if quantized."""
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
    def __init__(self, f: BinaryIO, label: str):
        self.f, self.label = f, label
        self.start = f.tell()

    @property
    def pos(self) -> int:
        return self.f.tell() - self.start

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFTruncated(f"{self.label}: truncated GGUF header")
        return b

    def u32(self) -> int:
        return _U32.unpack(self.read(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.read(8))[0]

    def count(self, what: str) -> int:
        n = self.u64()
        if n > _MAX_ITEMS:
            raise GGUFFormatError(f"{self.label}: implausible {what} length {n}")
        return n

    def string(self) -> str:
        return self.read(self.count("string")).decode("utf-8", errors="replace")

    def vtype(self, key: str) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError as e:
            raise GGUFFormatError(f"{self.label}: unknown value type {raw} for key {key}") from e

    def value(self, vtype: GGUFValueType, key: str) -> tuple[Any, Any]:
        if vtype == GGUFValueType.STRING:
            return self.string(), vtype
        if vtype == GGUFValueType.ARRAY:
            itype = self.vtype(key)
            return self.array(itype, self.count("array"), key), (GGUFValueType.ARRAY, itype)
        dt = SCALAR_DTYPES[vtype]
        return np.frombuffer(self.read(dt.itemsize), dt)[0].item(), vtype

    def array(self, itype: GGUFValueType, n: int, key: str) -> list:
        if itype in SCALAR_DTYPES:
            dt = SCALAR_DTYPES[itype]
            return np.frombuffer(self.read(dt.itemsize * n), dt).tolist()
        return [self.value(itype, key)[0] for _ in range(n)]


def read_header(src: BinaryIO | bytes, *, label: str, size: int | None = None) -> GGUFHeader:
    """Parse the GGUF header (v2/v3) at the start of `src` (bytes, or a binary file at its current position).

    `label` names the source in errors. `size`: the whole file's size, to check every tensor lies inside it
    (None: not checked). Raises GGUFTruncated when `src` ends inside the header, GGUFFormatError on anything
    malformed.
    """
    cur = _Cursor(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src, label)
    if cur.read(4) != MAGIC:
        raise GGUFFormatError(f"{label} is not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in VERSIONS:
        raise GGUFFormatError(f"{label}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    metadata, types = _read_kv(cur, n_kv)
    tensors = [_read_tensor_info(cur) for _ in range(n_tensors)]
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFFormatError(f"{label}: invalid general.alignment {alignment!r}")
    data_offset = cur.pos + (-cur.pos % alignment)
    for t in tensors if size is not None else ():
        if data_offset + t.offset + t.nbytes > size:
            raise GGUFFormatError(f"{label}: truncated (tensor {t.name} extends past end of file)")
    return GGUFHeader(version, metadata, types, tensors, alignment, data_offset)


def read_gguf(path: str | Path, *, size: int | None = None) -> GGUFFile:
    """Parse the header of the GGUF at `path`. `size`: the original file's size when `path` holds only its
    header (default: the size of `path`). Raises GGUFFormatError on anything malformed."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot open {path}: {e.strerror}") from e
    with f:
        h = read_header(f, label=str(path), size=size if size is not None else os.fstat(f.fileno()).st_size)
    return GGUFFile(h.version, h.metadata, h.types, h.tensors, h.alignment, h.data_offset, path)


def _read_kv(cur: _Cursor, n_kv: int) -> tuple[dict, dict]:
    metadata: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key], types[key] = cur.value(cur.vtype(key), key)
    return metadata, types


def _read_tensor_info(cur: _Cursor) -> TensorInfo:
    name = cur.string()
    n_dims = cur.u32()
    if not 1 <= n_dims <= 4:
        raise GGUFFormatError(f"{cur.label}: tensor {name} has {n_dims} dims")
    shape = tuple(cur.u64() for _ in range(n_dims))
    ggml_type = cur.u32()
    if ggml_type not in _KNOWN_TYPES:
        raise GGUFFormatError(f"{cur.label}: tensor {name} has unknown ggml type {ggml_type}")
    offset = cur.u64()
    try:
        nbytes = tensor_nbytes(ggml_type, shape)
    except ValueError as e:  # a row that is not a whole number of blocks
        raise GGUFFormatError(f"{cur.label}: tensor {name}: {e}") from e
    return TensorInfo(name, ggml_type, shape, offset, nbytes)
