"""The ggml backend registry, which llama-cpp-python does not wrap: devices, buffer types, tensor overrides.

llama-cpp-python declares `llama_model_params.tensor_buft_overrides` as an unused `void *`, but llama.cpp
honours it, so we build the NULL-terminated `llama_model_tensor_buft_override` array ourselves with buffer
types looked up in the bundled libggml. The library is opened on first use (`lib()`), not at import.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as C

from glmlocal.errors import EngineError
from quantize import libs

LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
_vp, _sz, _cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p


def load(name: str) -> ctypes.CDLL:
    """The library instance libllama itself uses (see quantize.libs: another copy of the file would be
    a second ggml with its own backend registry, and an RPC server registered there would be invisible to
    llama.cpp's default device list)."""
    return ctypes.CDLL(str(libs.lib_path(name, LIB_DIR)))


_SIGNATURES = [
    ("ggml_backend_reg_count", [], _sz),
    ("ggml_backend_reg_get", [_sz], _vp),
    ("ggml_backend_reg_name", [_vp], _cp),
    ("ggml_backend_dev_count", [], _sz),
    ("ggml_backend_dev_get", [_sz], _vp),
    ("ggml_backend_dev_name", [_vp], _cp),
    ("ggml_backend_dev_description", [_vp], _cp),
    ("ggml_backend_dev_type", [_vp], ctypes.c_int),
    ("ggml_backend_dev_memory", [_vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz)], None),
    ("ggml_backend_dev_backend_reg", [_vp], _vp),
    ("ggml_backend_dev_buffer_type", [_vp], _vp),
    ("ggml_backend_dev_host_buffer_type", [_vp], _vp),
    ("ggml_backend_dev_by_name", [_cp], _vp),
    ("ggml_backend_dev_by_type", [ctypes.c_int], _vp),
    ("ggml_backend_buft_name", [_vp], _cp),
    ("ggml_backend_register", [_vp], None),
    ("ggml_backend_reg_dev_count", [_vp], _sz),
    ("ggml_backend_reg_dev_get", [_vp, _sz], _vp),
]


@functools.cache
def lib() -> ctypes.CDLL:
    """libggml (the copy libllama uses) with the signatures we call declared; opened once, on first use."""
    llama_cpp.llama_backend_init()
    ggml = load("ggml")
    for name, args, res in _SIGNATURES:
        fn = getattr(ggml, name)
        fn.argtypes, fn.restype = args, res
    return ggml


class BuftOverride(ctypes.Structure):
    """`struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(frozen=True)
class Device:
    """One ggml backend device (the CPU counts as one), as the backend registry describes it.

    `type` is ggml's: "GPU" (dedicated memory; Metal says GPU too), "IGPU" (an integrated GPU using host memory:
    CUDA's prop.integrated, e.g. DGX Spark's GB10; Vulkan's integrated devices), "CPU", "ACCEL" (BLAS, AMX).
    `backend` is the registry the device belongs to: "CUDA", "ROCm"/"HIP", "Metal", "Vulkan", "RPC", "CPU".
    Memory is what the backend reports: Metal's total is recommendedMaxWorkingSetSize (its free = total minus
    what is allocated); CUDA on an integrated GPU reports /proc/meminfo MemAvailable as free; Vulkan sums every
    memory heap of an integrated GPU (the GTT pool on AMD APUs).
    """

    name: str
    description: str
    type: str
    free_bytes: int
    total_bytes: int
    buffer_type: str
    backend: str = ""


def backend_names() -> list[str]:
    """Names of the ggml backends this llama-cpp-python build registered, e.g. ["CPU"] or ["CUDA", "CPU"]."""
    ggml = lib()
    return [ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
            for i in range(ggml.ggml_backend_reg_count())]


def devices() -> list[Device]:
    """Every device llama.cpp can place tensors on, with its free/total memory as the backend reports it."""
    ggml = lib()
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = _sz(0), _sz(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        buft = ggml.ggml_backend_dev_buffer_type(dev)
        reg = ggml.ggml_backend_dev_backend_reg(dev)
        out.append(Device(
            name=ggml.ggml_backend_dev_name(dev).decode(),
            description=(ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            type=DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev), "?"),
            free_bytes=free.value, total_bytes=total.value,
            buffer_type=ggml.ggml_backend_buft_name(buft).decode() if buft else "",
            backend=ggml.ggml_backend_reg_name(reg).decode() if reg else "",
        ))
    return out


def system_info() -> str:
    """llama.cpp's one-line feature summary (SIMD flags per backend)."""
    return C.llama_print_system_info().decode(errors="replace").strip()


def build_info() -> tuple[str, str]:
    """(llama.cpp commit the library was built from, ggml version), as libggml-base reports them."""
    base = load("ggml-base")
    base.ggml_commit.restype = base.ggml_version.restype = _cp
    return base.ggml_commit().decode(errors="replace"), base.ggml_version().decode(errors="replace")


def buffer_type(name: str) -> int:
    """Look up a buffer type by device name ("CPU", "CUDA0") or buffer-type name ("CUDA_Host").

    Raises EngineError listing the known names, like llama.cpp's `-ot` does.
    """
    ggml = lib()
    known = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        candidates = [ggml.ggml_backend_dev_buffer_type(dev), ggml.ggml_backend_dev_host_buffer_type(dev)]
        dev_name = ggml.ggml_backend_dev_name(dev).decode()
        if dev_name.upper() == name.upper() and candidates[0]:
            return candidates[0]
        for buft in filter(None, candidates):
            buft_name = ggml.ggml_backend_buft_name(buft).decode()
            known.append(buft_name)
            if buft_name.upper() == name.upper():
                return buft
    raise EngineError(f"unknown buffer type {name!r} in tensor override",
                      hint=f"available: {', '.join(sorted(set(known)))}")


def device_array(names: list[str]) -> ctypes.Array:
    """A NULL-terminated `ggml_backend_dev_t[]` for llama_model_params.devices (EngineError for an unknown name)."""
    ggml = lib()
    arr = (_vp * (len(names) + 1))()
    for i, name in enumerate(names):
        arr[i] = ggml.ggml_backend_dev_by_name(name.encode())
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


def gpu_devices(devs: list[Device] | None = None) -> list[Device]:
    """The devices llama.cpp offloads to, in its order (main_gpu / tensor_split / -ngl index them):
    RPC devices first, then GPUs, then integrated GPUs only when there is no discrete one.
    `devs`: a device list to choose from (default: this process's registry)."""
    devs = [d for d in (devices() if devs is None else devs) if d.type in ("GPU", "IGPU")]
    rpc = [d for d in devs if d.type == "GPU" and d.name.startswith("RPC")]
    gpus = [d for d in devs if d.type == "GPU" and not d.name.startswith("RPC")]
    igpus = [d for d in devs if d.type == "IGPU"]
    return rpc + gpus + (igpus if not gpus else [])
