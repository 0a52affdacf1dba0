"""llama.cpp's log, which is process-global: `router()` collects it (installed on first use) so the engine can
report per-device buffer sizes and the per-tensor "buffer type overridden" lines; parsers for those lines;
`capture_stderr` for the few messages C code writes straight to fd 2.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp.llama_cpp as C

from glmlocal.llama import ggml

_log = logging.getLogger("glmlocal.llama")
_log.addHandler(logging.NullHandler())  # a library never prints; the CLI may attach a handler
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
    out: list[str] = []
    sys.stderr.flush()
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



@functools.cache
def router() -> LogRouter:
    """The process's one LogRouter, installed as llama.cpp's log callback on first use."""
    r = LogRouter()
    r.install()
    return r


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


def buffers_by_device(buffers: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """parse_buffers' {kind: {buffer name: bytes}} regrouped as {device name: {kind: bytes}}.

    Buffer names are buffer-type names: "CPU", "CPU_Mapped", "CPU_REPACK" all belong to the CPU;
    "CUDA0" is CUDA0's; an RPC buffer is named after the device's index on its server and the server
    ("RPC0[10.0.0.2:50052]"), so two servers' buffers are told apart through each device's buffer type.
    """
    by_buft = {d.buffer_type: d.name for d in ggml.devices() if d.buffer_type}
    out: dict[str, dict[str, int]] = {}
    for kind, sizes in buffers.items():
        for buf, nbytes in sizes.items():
            dev = "CPU" if buf.upper().startswith("CPU") else by_buft.get(buf, buf)
            out.setdefault(dev, {}).setdefault(kind, 0)
            out[dev][kind] += nbytes
    return out


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """{tensor name: buffer type} for every "buffer type overridden" line llama.cpp logged."""
    return {m.group(1): m.group(2) for m in map(_OVERRIDE_RE.search, lines) if m}


