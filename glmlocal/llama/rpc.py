"""RPC devices (ggml-rpc): another process's or machine's backend, which llama.cpp sees as a GPU. Serving this
machine's CPU to others (`glmlocal rpc-server`), registering a server as a device (`--rpc HOST:PORT`), and a
local server in a child process for tests and benchmarks.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import subprocess
import sys
import time

from glmlocal.errors import EngineError, InputError
from glmlocal.llama import ggml
from quantize import libs

_vp, _sz, _cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
_registered: dict[str, list[str]] = {}  # endpoint -> device names: ggml's registry is process-global too


@functools.cache
def _rpc_lib() -> ctypes.CDLL | None:
    """libggml-rpc from this build (llama-cpp-python built with -DGGML_RPC=ON), or None."""
    if not libs.lib_path("ggml-rpc", ggml.LIB_DIR).is_file():
        return None
    rpc = ggml.load("ggml-rpc")
    rpc.ggml_backend_rpc_add_server.argtypes, rpc.ggml_backend_rpc_add_server.restype = [_cp], _vp
    rpc.ggml_backend_rpc_start_server.argtypes = [_cp, _cp, _sz, _sz, ctypes.POINTER(_vp)]
    rpc.ggml_backend_rpc_start_server.restype = None
    return rpc


def rpc_available() -> bool:
    """Whether this llama-cpp-python build has the RPC backend (`--rpc HOST:PORT`)."""
    return _rpc_lib() is not None


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); InputError for anything else (ggml-rpc aborts the process on it)."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"bad RPC endpoint {endpoint!r}", hint="use HOST:PORT, e.g. 192.168.1.20:50052")
    return host, int(port)


def _reachable(host: str, port: int, timeout: float) -> bool:
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
    if endpoint in _registered:
        return _registered[endpoint]
    rpc = _rpc_lib()
    if rpc is None:
        raise EngineError("this llama-cpp-python was built without the RPC backend",
                          hint="rebuild it with the flags `glmlocal doctor --cmake-args` prints (they add -DGGML_RPC=ON)")
    host, port = parse_endpoint(endpoint)
    if not _reachable(host, port, timeout):
        raise EngineError(f"no RPC server answers at {endpoint}",
                          hint="start one there: `glmlocal rpc-server HOST:PORT` (or llama.cpp's rpc-server)")
    g = ggml.lib()
    reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise EngineError(f"the RPC server at {endpoint} reports no devices")
    g.ggml_backend_register(reg)
    names = [g.ggml_backend_dev_name(g.ggml_backend_reg_dev_get(reg, i)).decode()
             for i in range(g.ggml_backend_reg_dev_count(reg))]
    _registered[endpoint] = names
    return names


def serve_rpc(endpoint: str, threads: int = 0, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU backend over RPC at `endpoint` (blocks forever; run it in its own process).

    Anyone who can reach the port can run code on the backend: bind 127.0.0.1 or a trusted network only.
    """
    rpc = _rpc_lib()
    if rpc is None:
        raise EngineError("this llama-cpp-python was built without the RPC backend")
    parse_endpoint(endpoint)
    cpu = (_vp * 1)(ggml.lib().ggml_backend_dev_by_type(0))
    threads = threads or os.cpu_count() or 1
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, cpu)


class RpcServer:
    """A local RPC server in a child process (`with RpcServer() as srv: add_rpc_server(srv.endpoint)`).

    A child, because ggml_backend_rpc_start_server never returns; stopped (terminated) on exit.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, threads: int = 1, startup_s: float = 30.0):
        self.host, self.port, self.threads, self.startup_s = host, port or _free_port(host), threads, startup_s
        self.endpoint = f"{host}:{self.port}"
        self.proc = None

    def __enter__(self) -> RpcServer:  # noqa: PYI034 (3.11 target; the class is not subclassed)
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
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
