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

from glmlocal import llama_libs
from glmlocal.errors import EngineError

LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
_log = logging.getLogger("glmlocal.llama")
_log.addHandler(logging.NullHandler())  # a library never prints; the CLI may attach a handler


def _load(name: str) -> ctypes.CDLL:
    """The library instance libllama itself uses (see glmlocal.llama_libs: another copy of the file would be
    a second ggml with its own backend registry, and an RPC server registered there would be invisible to
    llama.cpp's default device list)."""
    return ctypes.CDLL(str(llama_libs.lib_path(name, LIB_DIR)))


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


def device_array(names: list[str]) -> ctypes.Array:
    """A NULL-terminated `ggml_backend_dev_t[]` for llama_model_params.devices (EngineError for an unknown name)."""
    llama_cpp.llama_backend_init()
    arr = (_vp * (len(names) + 1))()
    for i, name in enumerate(names):
        arr[i] = _ggml.ggml_backend_dev_by_name(name.encode())
        if not arr[i]:
            known = ", ".join(d.name for d in devices())
            raise EngineError(f"llama.cpp has no device {name!r}", hint=f"available: {known}")
    return arr


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


def buffers_by_device(buffers: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """parse_buffers' {kind: {buffer name: bytes}} regrouped as {device name: {kind: bytes}}.

    Buffer names are buffer-type names: "CPU", "CPU_Mapped", "CPU_REPACK" all belong to the CPU;
    "CUDA0" is CUDA0's; an RPC buffer is named after the device's index on its server and the server
    ("RPC0[10.0.0.2:50052]"), so two servers' buffers are told apart through each device's buffer type.
    """
    by_buft = {d.buffer_type: d.name for d in devices() if d.buffer_type}
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


# ---------------------------------------------------------------------------------------------
# RPC devices (ggml-rpc): another process's or machine's backend, seen by llama.cpp as a GPU
# ---------------------------------------------------------------------------------------------
_rpc_state: dict = {"lib": None, "registered": {}}


def _rpc_lib() -> ctypes.CDLL | None:
    """libggml-rpc from this build (llama-cpp-python built with -DGGML_RPC=ON), or None."""
    if _rpc_state["lib"] is None:
        if not llama_libs.lib_path("ggml-rpc", LIB_DIR).is_file():
            return None
        lib = _load("ggml-rpc")
        lib.ggml_backend_rpc_add_server.argtypes, lib.ggml_backend_rpc_add_server.restype = [_cp], _vp
        lib.ggml_backend_rpc_start_server.argtypes = [_cp, _cp, _sz, _sz, ctypes.POINTER(_vp)]
        lib.ggml_backend_rpc_start_server.restype = None
        _ggml.ggml_backend_register.argtypes, _ggml.ggml_backend_register.restype = [_vp], None
        _ggml.ggml_backend_reg_dev_count.argtypes, _ggml.ggml_backend_reg_dev_count.restype = [_vp], _sz
        _ggml.ggml_backend_reg_dev_get.argtypes, _ggml.ggml_backend_reg_dev_get.restype = [_vp, _sz], _vp
        _rpc_state["lib"] = lib
    return _rpc_state["lib"]


def rpc_available() -> bool:
    """Whether this llama-cpp-python build has the RPC backend (`--rpc HOST:PORT`)."""
    return _rpc_lib() is not None


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); InputError for anything else (ggml-rpc aborts the process on it)."""
    from glmlocal.errors import InputError

    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"bad RPC endpoint {endpoint!r}", hint="use HOST:PORT, e.g. 192.168.1.20:50052")
    return host, int(port)


def _reachable(host: str, port: int, timeout: float) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def add_rpc_server(endpoint: str, timeout: float = 5.0) -> list[str]:
    """Register the RPC server at `endpoint` with ggml; returns its device names ("RPC0", ...).

    Process-global and permanent: every later model load in this process sees these devices as GPUs
    (llama.cpp puts RPC devices first). Registering the same endpoint again returns the same names.
    Raises EngineError when the build lacks RPC or nothing listens there (ggml-rpc itself would abort).
    """
    endpoint = endpoint.strip()
    if endpoint in _rpc_state["registered"]:
        return _rpc_state["registered"][endpoint]
    lib = _rpc_lib()
    if lib is None:
        raise EngineError("this llama-cpp-python was built without the RPC backend",
                          hint="rebuild it with the flags `glmlocal doctor --cmake-args` prints (they add -DGGML_RPC=ON)")
    host, port = parse_endpoint(endpoint)
    if not _reachable(host, port, timeout):
        raise EngineError(f"no RPC server answers at {endpoint}",
                          hint="start one there: `glmlocal rpc-server HOST:PORT` (or llama.cpp's rpc-server)")
    llama_cpp.llama_backend_init()
    reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise EngineError(f"the RPC server at {endpoint} reports no devices")
    _ggml.ggml_backend_register(reg)
    names = [_ggml.ggml_backend_dev_name(_ggml.ggml_backend_reg_dev_get(reg, i)).decode()
             for i in range(_ggml.ggml_backend_reg_dev_count(reg))]
    _rpc_state["registered"][endpoint] = names
    return names


def gpu_devices() -> list[Device]:
    """The devices llama.cpp offloads to, in its order (main_gpu / tensor_split / -ngl index them):
    RPC devices first, then GPUs, then integrated GPUs only when there is no discrete one."""
    devs = [d for d in devices() if d.type in ("GPU", "IGPU")]
    rpc = [d for d in devs if d.type == "GPU" and d.name.startswith("RPC")]
    gpus = [d for d in devs if d.type == "GPU" and not d.name.startswith("RPC")]
    igpus = [d for d in devs if d.type == "IGPU"]
    return rpc + gpus + (igpus if not gpus else [])


def serve_rpc(endpoint: str, threads: int = 0, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU backend over RPC at `endpoint` (blocks forever; run it in its own process).

    Anyone who can reach the port can run code on the backend: bind 127.0.0.1 or a trusted network only.
    """
    import os

    lib = _rpc_lib()
    if lib is None:
        raise EngineError("this llama-cpp-python was built without the RPC backend")
    parse_endpoint(endpoint)
    llama_cpp.llama_backend_init()
    cpu = (_vp * 1)(_ggml.ggml_backend_dev_by_type(0))
    threads = threads or os.cpu_count() or 1
    lib.ggml_backend_rpc_start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, cpu)


class RpcServer:
    """A local RPC server in a child process (`with RpcServer() as srv: add_rpc_server(srv.endpoint)`).

    A child, because ggml_backend_rpc_start_server never returns; stopped (terminated) on exit.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, threads: int = 1, startup_s: float = 30.0):
        self.host, self.port, self.threads, self.startup_s = host, port or _free_port(host), threads, startup_s
        self.endpoint = f"{host}:{self.port}"
        self.proc = None

    def __enter__(self) -> RpcServer:  # noqa: PYI034 (3.11 target; the class is not subclassed)
        import subprocess
        import sys
        import time

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glmlocal", "rpc-server", self.endpoint, "--threads", str(self.threads)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.startup_s
        while not _reachable(self.host, self.port, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.__exit__()
                raise EngineError(f"the RPC server at {self.endpoint} did not start: {err.strip()[-300:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 (TimeoutExpired: a server stuck in a computation)
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
