"""Streaming GGUF v3 writer: declare metadata and every tensor (name, ggml shape, type) up front, then
stream the data tensor by tensor (or slice by slice) in declaration order.

Phases, as in gguf-py: header, KV, tensor infos, aligned data. Output goes to `<out>.part` and is renamed
to the final name only after every declared byte was written; any error (including ENOSPC) removes the
partial file. Usable standalone, e.g.:

    w = GGUFWriter(path)
    w.add_string("general.architecture", "glm4moe")
    w.add_tensor_info("a.weight", (64, 4), GGMLType.F32)
    with w:
        w.write_tensor_data("a.weight", data)
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFValueType

from quantize.errors import ConversionError, DiskSpaceError
from quantize.ggml import GGMLType, tensor_nbytes
from quantize.gguf_reader import MAGIC, SCALAR_DTYPES

VERSION = 3  # the layout written below (gguf-py's GGUF_VERSION names the newest, which may move on)
ALIGNMENT = GGUF_DEFAULT_ALIGNMENT
# Scalars packed as gguf-py's writer packs them (struct, so a value of the wrong type is refused, not converted).
_PACK = {vt: struct.Struct("<" + fmt) for vt, fmt in gguf.GGUFWriter._simple_value_packing.items()}


class OutputNotWritableError(ConversionError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}", hint="choose a writable output path with -o")
        self.path = path


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    nbytes: int
    offset: int = 0
    written: int = 0


def _pad(n: int, align: int = ALIGNMENT) -> int:
    return -n % align


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


class GGUFWriter:
    """Write one GGUF file in a single forward pass (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self._kv: dict[str, bytes] = {}
        self._tensors: dict[str, _Tensor] = {}
        self._f = None
        self._order: list[str] = []
        self._cursor = 0  # index into _order of the tensor being streamed
        self._created = False  # whether we created self.part (only then may abort delete it)
        self.bytes_written = 0

    # ------------------------------------------------------------------ metadata
    def add_kv(self, key: str, vtype: GGUFValueType, value: Any) -> None:
        """Add (or overwrite in place, like gguf-py) one key."""
        self._kv[key] = struct.pack("<I", vtype) + self._encode(vtype, value)

    def add_array(self, key: str, itype: GGUFValueType, values: Iterable) -> None:
        values = list(values)
        if itype == GGUFValueType.STRING:
            body = b"".join(_string(v) for v in values)
        else:
            body = np.asarray(values, dtype=SCALAR_DTYPES[itype]).tobytes()
        self._kv[key] = struct.pack("<IIQ", GGUFValueType.ARRAY, itype, len(values)) + body

    def add_string(self, key: str, value: str) -> None:
        self.add_kv(key, GGUFValueType.STRING, value)

    def add_u32(self, key: str, value: int) -> None:
        self.add_kv(key, GGUFValueType.UINT32, value)

    def add_f32(self, key: str, value: float) -> None:
        self.add_kv(key, GGUFValueType.FLOAT32, value)

    def add_bool(self, key: str, value: bool) -> None:
        self.add_kv(key, GGUFValueType.BOOL, value)

    def remove_kv(self, key: str) -> None:
        self._kv.pop(key, None)

    @staticmethod
    def _encode(vtype: GGUFValueType, value: Any) -> bytes:
        if vtype == GGUFValueType.STRING:
            return _string(value)
        return _PACK[vtype].pack(value)

    # ------------------------------------------------------------------ tensors
    def add_tensor_info(self, name: str, shape: tuple[int, ...], ggml_type: GGMLType) -> None:
        """Declare a tensor; `shape` in ggml order (ne0 = row length)."""
        if self._f is not None:
            raise RuntimeError("tensor infos must be declared before the header is written")
        if name in self._tensors:
            raise ValueError(f"duplicate tensor {name}")
        shape = tuple(int(d) for d in shape)
        self._tensors[name] = _Tensor(name, shape, GGMLType(ggml_type), tensor_nbytes(ggml_type, shape))
        self._order.append(name)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes + _pad(t.nbytes) for t in self._tensors.values())

    def header_bytes(self) -> bytes:
        out = [MAGIC, struct.pack("<IQQ", VERSION, len(self._tensors), len(self._kv))]
        for key, body in self._kv.items():
            out += [_string(key), body]
        offset = 0
        for name in self._order:
            t = self._tensors[name]
            t.offset = offset
            out += [_string(name), struct.pack("<I", len(t.shape)),
                    struct.pack(f"<{len(t.shape)}Q", *t.shape), struct.pack("<IQ", t.ggml_type, offset)]
            offset += t.nbytes + _pad(t.nbytes)
        head = b"".join(out)
        return head + b"\0" * _pad(len(head))

    @property
    def total_bytes(self) -> int:
        return len(self.header_bytes()) + self.data_bytes

    # ------------------------------------------------------------------ streaming
    def open(self) -> None:
        """Create `<out>.part` and write header, KV and tensor infos."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.part, "wb")
            self._created = True
        except OSError as e:
            raise OutputNotWritableError(self.path, e.strerror or str(e)) from e
        self._write(self.header_bytes())

    def write_tensor_data(self, name: str, data) -> None:
        """Append bytes of tensor `name` (may be called several times per tensor, e.g. per expert)."""
        if self._cursor >= len(self._order) or self._order[self._cursor] != name:
            expected = self._order[self._cursor] if self._cursor < len(self._order) else None
            raise RuntimeError(f"tensor data out of order: got {name}, expected {expected}")
        t = self._tensors[name]
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if t.written + buf.nbytes > t.nbytes:
            raise RuntimeError(f"too much data for {name}: {t.written + buf.nbytes} > {t.nbytes}")
        self._write(buf)
        t.written += buf.nbytes
        if t.written == t.nbytes:
            self._write(b"\0" * _pad(t.nbytes))
            self._cursor += 1

    def _write(self, b) -> None:
        try:
            self._f.write(b)
            self.bytes_written += len(b) if isinstance(b, bytes) else memoryview(b).nbytes
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(str(self.path), self.total_bytes, _free(self.path.parent)) from e
            if e.errno == errno.EFBIG:
                raise OutputNotWritableError(
                    self.path, f"file size limit reached (the output needs {self.total_bytes / 2**30:.2f} GiB)") from e
            raise OutputNotWritableError(self.path, e.strerror or str(e)) from e

    def finish(self) -> Path:
        """Check that every tensor was fully written, flush, and rename `.part` to the final name."""
        if self._cursor != len(self._order):
            missing = self._order[self._cursor]
            self.abort()
            raise RuntimeError(f"GGUF incomplete: tensor {missing} not fully written")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(str(self.path), self.total_bytes, _free(self.path.parent)) from e
            raise OutputNotWritableError(self.path, e.strerror or str(e)) from e
        self._f.close()
        self._f = None
        os.replace(self.part, self.path)
        self._created = False
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file (safe to call more than once)."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass  # close can re-raise the ENOSPC that caused the abort
            self._f = None
        if self._created:
            try:
                self.part.unlink()
            except FileNotFoundError:
                pass
            self._created = False

    def __enter__(self) -> "GGUFWriter":
        if self._f is None:
            self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _free(path: Path) -> int:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0
