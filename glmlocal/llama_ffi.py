"""The ctypes bits llama-cpp-python does not wrap: ggml backends, buffer types, tensor overrides, log capture.

llama-cpp-python declares `llama_model_params.tensor_buft_overrides` as an unused `void *`, but llama.cpp
honours it, so we build the NULL-terminated `llama_model_tensor_buft_override` array ourselves with buffer
types looked up in the bundled libggml. llama.cpp's log is process-global; `LogRouter` collects it so the
engine can report per-device buffer sizes and the per-tensor "buffer type overridden" lines.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as C

from glmlocal.errors import EngineError

LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
_log = logging.getLogger("glmlocal.llama")
_log.addHandler(logging.NullHandler())  # a library never prints; the CLI may attach a handler


def _load(name: str) -> ctypes.CDLL:
    # Already mapped by llama_cpp; dlopen returns the same handle.
    return ctypes.CDLL(str(LIB_DIR / f"lib{name}.so"))


_ggml = _load("ggml")
_vp, _sz, _cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
for _name, _args, _res in [
    ("ggml_backend_reg_count", [], _sz),
    ("ggml_backend_reg_get", [_sz], _vp),
    ("ggml_backend_reg_name", [_vp], _cp),
    ("ggml_backend_dev_count", [], _sz),
    ("ggml_backend_dev_get", [_sz], _vp),
    ("ggml_backend_dev_name", [_vp], _cp),
    ("ggml_backend_dev_description", [_vp], _cp),
    ("ggml_backend_dev_type", [_vp], ctypes.c_int),
    ("ggml_backend_dev_memory", [_vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz)], None),
    ("ggml_backend_dev_buffer_type", [_vp], _vp),
    ("ggml_backend_dev_host_buffer_type", [_vp], _vp),
    ("ggml_backend_dev_by_name", [_cp], _vp),
    ("ggml_backend_dev_by_type", [ctypes.c_int], _vp),
    ("ggml_backend_buft_name", [_vp], _cp),
]:
    _fn = getattr(_ggml, _name)
    _fn.argtypes, _fn.restype = _args, _res


class BuftOverride(ctypes.Structure):
    """`struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(frozen=True)
class Device:
    """One ggml backend device (the CPU counts as one)."""

    name: str
    description: str
    type: str
    free_bytes: int
    total_bytes: int
    buffer_type: str


def backend_names() -> list[str]:
    """Names of the ggml backends this llama-cpp-python build registered, e.g. ["CPU"] or ["CUDA", "CPU"]."""
    llama_cpp.llama_backend_init()
    return [_ggml.ggml_backend_reg_name(_ggml.ggml_backend_reg_get(i)).decode()
            for i in range(_ggml.ggml_backend_reg_count())]


def devices() -> list[Device]:
    """Every device llama.cpp can place tensors on, with its free/total memory as the backend reports it."""
    llama_cpp.llama_backend_init()
    out = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        free, total = _sz(0), _sz(0)
        _ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        buft = _ggml.ggml_backend_dev_buffer_type(dev)
        out.append(Device(
            name=_ggml.ggml_backend_dev_name(dev).decode(),
            description=(_ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            type=DEVICE_TYPES.get(_ggml.ggml_backend_dev_type(dev), "?"),
            free_bytes=free.value, total_bytes=total.value,
            buffer_type=_ggml.ggml_backend_buft_name(buft).decode() if buft else "",
        ))
    return out


def system_info() -> str:
    """llama.cpp's one-line feature summary (SIMD flags per backend)."""
    return C.llama_print_system_info().decode(errors="replace").strip()


def buffer_type(name: str) -> int:
    """Look up a buffer type by device name ("CPU", "CUDA0") or buffer-type name ("CUDA_Host").

    Raises EngineError listing the known names, like llama.cpp's `-ot` does.
    """
    llama_cpp.llama_backend_init()
    known = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        candidates = [_ggml.ggml_backend_dev_buffer_type(dev), _ggml.ggml_backend_dev_host_buffer_type(dev)]
        dev_name = _ggml.ggml_backend_dev_name(dev).decode()
        if dev_name.upper() == name.upper() and candidates[0]:
            return candidates[0]
        for buft in filter(None, candidates):
            buft_name = _ggml.ggml_backend_buft_name(buft).decode()
            known.append(buft_name)
            if buft_name.upper() == name.upper():
                return buft
    raise EngineError(f"unknown buffer type {name!r} in tensor override",
                      hint=f"available: {', '.join(sorted(set(known)))}")


class OverrideArray:
    """A NULL-terminated override array plus the pattern bytes it points into (kept alive together)."""

    def __init__(self, overrides: list[tuple[str, str]]):
        for pattern, _ in overrides:
            try:
                re.compile(pattern)
            except re.error as e:
                raise EngineError(f"invalid tensor override pattern {pattern!r}: {e}") from None
        limit = C.llama_max_tensor_buft_overrides()
        if len(overrides) >= limit:
            raise EngineError(f"{len(overrides)} tensor overrides exceed llama.cpp's limit of {limit - 1}")
        self._patterns = [p.encode() for p, _ in overrides]
        self.array = (BuftOverride * (len(overrides) + 1))()
        for i, ((_, buft_name), pat) in enumerate(zip(overrides, self._patterns)):
            self.array[i].pattern = pat
            self.array[i].buft = buffer_type(buft_name)
        # the last element stays zeroed: pattern == NULL terminates the list

    @property
    def pointer(self) -> int:
        return ctypes.cast(self.array, ctypes.c_void_p).value


# ---------------------------------------------------------------------------------------------
# Log capture
# ---------------------------------------------------------------------------------------------
_LEVEL_CONT = 5
# enum ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
# (llama-cpp-python's own mapping still uses the older numbering).
_PY_LEVEL = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class LogRouter:
    """Receives every llama.cpp / ggml log fragment, assembles lines, hands them to active captures.

    Warnings and errors also go to the `glmlocal.llama` Python logger; nothing is printed.
    """

    def __init__(self, keep: int = 4000):
        self.recent: deque[str] = deque(maxlen=keep)
        self._sinks: list[list[str]] = []
        self._partial = ""
        self._level = 1
        self._lock = threading.Lock()
        self._cb = C.llama_log_callback(self._on_log)  # must outlive the process's use of it

    def install(self) -> None:
        C.llama_log_set(self._cb, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: int) -> None:
        try:
            chunk = (text or b"").decode("utf-8", errors="replace")
            with self._lock:
                if level != _LEVEL_CONT:
                    self._level = level
                self._partial += chunk
                *lines, self._partial = self._partial.split("\n")
                for line in lines:
                    self._emit(line)
        except Exception:  # noqa: BLE001, S110 (a Python exception must never unwind into C)
            pass

    def _emit(self, line: str) -> None:
        self.recent.append(line)
        for sink in self._sinks:
            sink.append(line)
        py_level = _PY_LEVEL.get(self._level, logging.DEBUG)
        if py_level >= logging.WARNING:
            _log.log(py_level, "%s", line)

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect the complete lines logged while the block runs."""
        sink: list[str] = []
        with self._lock:
            self._sinks.append(sink)
        try:
            yield sink
        finally:
            with self._lock:
                if self._partial:
                    sink.append(self._partial)
                self._sinks.remove(sink)


@contextmanager
def capture_stderr() -> Iterator[list[str]]:
    """Capture what C code writes straight to fd 2 (llama.cpp's grammar parser uses fprintf(stderr)).

    Used only around short calls; the captured text is returned instead of printed.
    """
    import os
    import tempfile

    out: list[str] = []
    sys_stderr = __import__("sys").stderr
    sys_stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", errors="replace"))


ROUTER = LogRouter()
ROUTER.install()

_BUF_RE = {
    "model": re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"(\S+) KV buffer size =\s*([\d.]+) MiB"),
    "compute": re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB"),
    "output": re.compile(r"(\S+)\s+output buffer size =\s*([\d.]+) MiB"),
}
_OVERRIDE_RE = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


def parse_buffers(lines: list[str]) -> dict[str, dict[str, int]]:
    """{"model"|"kv"|"compute"|"output": {buffer name: bytes}} from llama.cpp's load log (MiB, 2 decimals)."""
    out: dict[str, dict[str, int]] = {k: {} for k in _BUF_RE}
    for line in lines:
        for kind, rx in _BUF_RE.items():
            m = rx.search(line)
            if m:
                out[kind][m.group(1)] = out[kind].get(m.group(1), 0) + int(float(m.group(2)) * 1024 * 1024)
    return out


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """{tensor name: buffer type} for every "buffer type overridden" line llama.cpp logged."""
    return {m.group(1): m.group(2) for m in map(_OVERRIDE_RE.search, lines) if m}
