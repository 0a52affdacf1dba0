"""Probe the machine the model will run on: GPUs, RAM, cores, memory bandwidth.

The only effectful part of planning. GPUs come from llama.cpp's own backend registry (the devices the engine
will offload to: CUDA, ROCm, Metal, Vulkan, with the free and total memory their backends report); NVML adds
what only it knows (bandwidth from memory clock and bus width, CUDA_VISIBLE_DEVICES, UUIDs) and stands in when
the build has no GPU backend. Unified-memory GPUs (Metal, DGX Spark's GB10, AMD APUs) share the host's RAM:
Hardware.unified then holds the pool and the OS limit on the GPU's share (glmlocal.plan.unified).
Everything can be overridden (`--gpu-mem 24GiB,24GiB`, `--ram 128GiB`, `--cpu-only`, bandwidths, or a
named `--machine` profile) so a user can plan for a machine they do not have yet.

Bandwidth estimates (they only feed the tokens/s estimate):
- GPU: a table of peak memory bandwidth by product name; else NVML's max memory clock x bus width
  x 2 (double data rate), which reproduces the datasheet figures (A100 40GB: 1215 MHz x 5120 bit
  -> 1555 GB/s; RTX 3090: 9751 MHz x 384 bit -> 936 GB/s).
- CPU: for the machine we run on, a short multi-threaded copy benchmark (numpy copies release the
  GIL); a copy moves 2 bytes per byte copied, so bandwidth = 2 x bytes / time. For a hypothetical
  machine (RAM override) we assume dual-channel DDR5-5600 (89.6 GB/s peak) unless --cpu-bw is given.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from glmlocal.errors import InputError
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.unified import UnifiedMemory, parse_meminfo
from glmlocal.plan.view import gib

GIB = 1024**3
DEFAULT_GPU_BW = 936e9  # RTX 3090-class 24 GB card, used when a GPU is given only by its memory size
DEFAULT_CPU_BW = 89.6e9  # dual-channel DDR5-5600: 2 channels x 8 bytes x 5600 MT/s
RpcDevice = tuple[str, int, int]  # a llama.cpp RPC device: (device name, free bytes, total bytes)

# Peak memory bandwidth (bytes/s) by a substring of the NVML product name; longest match wins.
GPU_BANDWIDTH = {
    "RTX 5090": 1792e9, "RTX 5080": 960e9, "RTX 5070 Ti": 896e9, "RTX 5070": 672e9,
    "RTX 4090": 1008e9, "RTX 4080": 717e9, "RTX 4070 Ti": 504e9, "RTX 4070": 504e9,
    "RTX 4060 Ti": 288e9, "RTX 4060": 272e9, "RTX 3090 Ti": 1008e9, "RTX 3090": 936e9,
    "RTX 3080 Ti": 912e9, "RTX 3080": 760e9, "RTX 3070": 448e9, "RTX 3060": 360e9,
    "RTX 2080 Ti": 616e9, "TITAN RTX": 672e9, "RTX A6000": 768e9, "RTX 6000 Ada": 960e9,
    "RTX PRO 6000": 1792e9, "RTX A5000": 768e9, "RTX A4000": 448e9, "A100-SXM4-80GB": 2039e9,
    "A100 80GB PCIe": 1935e9, "A100": 1555e9, "H100 PCIe": 2000e9, "H100 NVL": 3900e9, "H100": 3350e9,
    "H200": 4800e9, "GH200": 4000e9, "B200": 8000e9, "L40S": 864e9, "L40": 864e9, "L4": 300e9,
    "A40": 696e9, "A10": 600e9, "V100": 900e9, "T4": 320e9, "RX 7900 XTX": 960e9,
    # Unified-memory chips: the pool's bandwidth (spec values; sources in tests/test_hardware.py and machines.toml)
    "GB10": 273e9, "Radeon 8060S": 256e9, "Apple M1 Max": 400e9, "Apple M1 Ultra": 800e9, "Apple M2 Max": 400e9,
    "Apple M2 Ultra": 800e9, "Apple M3 Max": 400e9, "Apple M3 Ultra": 819e9, "Apple M4 Pro": 273e9,
    "Apple M4 Max": 546e9,
}


@dataclass(frozen=True)
class GPU:
    """One device llama.cpp offloads to; NVIDIA ones numbered as CUDA numbers them (after CUDA_VISIBLE_DEVICES).

    `device` is llama.cpp's name for it ("CUDA0", "RPC0", "Vulkan0", "MTL0"); empty means CUDA{index}.
    `op_offload`: the backend runs big-batch ops whose weights are in RAM itself (ggml-cuda, Metal and Vulkan
    do, for batches >= 32); backends without it (RPC) leave those ops, e.g. RAM-resident experts, to the CPU.
    `unified`: its memory is the host's RAM (Hardware.unified says how much of it the GPU may use).
    """

    index: int
    name: str
    total: int
    free: int
    bandwidth: float
    uuid: str = ""
    device: str = ""
    op_offload: bool = True
    unified: bool = False

    @property
    def device_name(self) -> str:
        return self.device or f"CUDA{self.index}"


@dataclass(frozen=True)
class Hardware:
    """What planning needs to know about a machine."""

    gpus: tuple[GPU, ...]
    ram_total: int
    ram_available: int
    cores: int
    cpu_bandwidth: float
    notes: tuple[str, ...] = ()
    unified: UnifiedMemory | None = None  # set when a GPU shares RAM: one pool, an OS limit on the GPU's share
    label: str = "this machine"  # how messages name it: "the planned machine" for --gpu-mem/--ram/--machine

    @property
    def cpu_only(self) -> bool:
        return not self.gpus


_UNITS = {"": GIB, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
          "mib": 1024**2, "g": GIB, "gb": 1000**3, "gib": GIB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776, '24GB' -> 24e9, '512MiB', '1.5T'; a bare number means GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot parse memory size {text!r}", hint="use e.g. 24GiB, 24GB, 512MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise InputError(f"memory size must be positive, got {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    """'24GiB,24GiB' -> two sizes (one per GPU)."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise InputError(f"no GPU memory sizes in {text!r}", hint="use e.g. --gpu-mem 24GiB,24GiB")
    return [parse_size(p) for p in parts]


def gpu_bandwidth(name: str, mem_clock_mhz: int | None = None, bus_width_bits: int | None = None) -> float:
    """Peak memory bandwidth for a GPU: the table by name, else clock x bus width x 2."""
    hits = [k for k in GPU_BANDWIDTH if k.lower() in name.lower()]
    if hits:
        return GPU_BANDWIDTH[max(hits, key=len)]
    if mem_clock_mhz and bus_width_bits:
        return mem_clock_mhz * 1e6 * 2 * bus_width_bits / 8
    return DEFAULT_GPU_BW


# --------------------------------------------------------------------------------------------
# NVIDIA through NVML
# --------------------------------------------------------------------------------------------
def visible_selection(env_value: str | None, uuids: list[str]) -> list[int] | None:
    """NVML indices CUDA will expose, in CUDA order, from CUDA_VISIBLE_DEVICES.

    None means "all". Entries are indices or (prefixes of) UUIDs ("GPU-8f3a..."); like CUDA, the
    list stops at the first entry that matches no device, and an empty value hides every GPU.
    """
    if env_value is None:
        return None
    chosen: list[int] = []
    for raw in env_value.split(","):
        item = raw.strip()
        idx = _match_device(item, uuids)
        if idx is None or idx in chosen:
            break
        chosen.append(idx)
    return chosen


def _match_device(item: str, uuids: list[str]) -> int | None:
    if re.fullmatch(r"\d+", item):
        i = int(item)
        return i if i < len(uuids) else None
    if not item:
        return None
    key = item if item.upper().startswith(("GPU-", "MIG-")) else f"GPU-{item}"
    hits = [i for i, u in enumerate(uuids) if u.lower().startswith(key.lower())]
    return hits[0] if len(hits) == 1 else None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_text(path: str) -> str | None:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def probe_gpus(nvml=None, env: dict | None = None,
               read: Callable[[str], str | None] = _read_text) -> tuple[list[GPU], list[str]]:
    """Visible NVIDIA GPUs via nvidia-ml-py. `nvml` may be injected (tests pass a fake module); `read` reads
    /proc/meminfo for a GPU whose NVML reports no memory (DGX Spark's GB10)."""
    notes: list[str] = []
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return [], ["nvidia-ml-py is not installed: no GPUs probed"]
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 (NVMLError_LibraryNotFound / DriverNotLoaded / OSError: no NVIDIA here)
        return [], [f"no NVIDIA driver ({type(e).__name__}): no local GPUs"]
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        env = os.environ if env is None else env
        selection = visible_selection(env.get("CUDA_VISIBLE_DEVICES"), uuids)
        order = list(range(len(handles))) if selection is None else selection
        if selection is not None:
            notes.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}: {len(order)} GPU(s) visible")
        return [_gpu_info(nvml, cuda_idx, handles[i], uuids[i], read) for cuda_idx, i in enumerate(order)], notes
    finally:
        nvml.nvmlShutdown()


def _gpu_info(nvml, cuda_index: int, handle, uuid: str, read: Callable[[str], str | None]) -> GPU:
    name = _text(nvml.nvmlDeviceGetName(handle))
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        total, free = int(mem.total), int(mem.free)
    except Exception:  # noqa: BLE001 (NVMLError_NotSupported: an integrated GPU has no memory of its own)
        total = free = 0
    unified = total == 0  # GB10: NVML_ERROR_NOT_SUPPORTED (or 0): its memory is the host's, /proc/meminfo
    if unified:
        total, free = parse_meminfo(read("/proc/meminfo") or "")
    try:
        clock = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM)
        bus = nvml.nvmlDeviceGetMemoryBusWidth(handle)
    except Exception:  # noqa: BLE001 (NVMLError_NotSupported: older drivers lack the bus-width query)
        clock = bus = None
    return GPU(index=cuda_index, name=name, total=total, free=free, bandwidth=gpu_bandwidth(name, clock, bus),
               uuid=uuid, unified=unified)


# --------------------------------------------------------------------------------------------
# CPU / RAM
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def measure_cpu_bandwidth(threads: int, total_bytes: int = 256 * 1024**2, repeats: int = 3) -> float:
    """Copy bandwidth over `threads` threads (bytes/s, read + write), best of `repeats`.

    256 MiB in all (above the L3 of desktop and most server CPUs), split over at most 32 threads;
    about a quarter of a second on an idle machine.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = max(1, min(threads, 32))
    nbytes = total_bytes // threads
    src = [np.ones(nbytes // 8) for _ in range(threads)]
    dst = [np.empty_like(s) for s in src]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda i: np.copyto(dst[i], src[i]), range(threads)))
            dt = time.perf_counter() - t0
            best = max(best, 2 * nbytes * threads / dt)
    return best


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def probe(options: PlanOptions | None = None, *, rpc_devices: tuple[tuple[str, int, int], ...] = (),
          env: dict | None = None, nvml=None, cpu_bw_probe: Callable[[int], float] | None = None,
          devices: list | None = None) -> Hardware:
    """Probe this machine, then apply the user's options (which win over what was probed).

    rpc_devices: llama.cpp RPC devices already registered ((name, free, total) each); otherwise the servers in
    options.rpc are registered here. llama.cpp puts them before local GPUs; --gpu-mem sizes apply in that order.
    env: the environment the NVML probe reads (CUDA_VISIBLE_DEVICES), for tests; devices: llama.cpp registry
    devices (glmlocal.llama.ggml.Device) instead of this process's, for tests. options.machine: a named
    profile from machines.toml instead of this machine (nothing is probed).
    """
    import psutil

    ov = options or PlanOptions()
    if ov.machine:
        from glmlocal.plan.machines import machine_hardware

        return machine_hardware(ov)
    if ov.rpc and not rpc_devices:
        rpc_devices = register_rpc(ov.rpc)
    if ov.ram:
        ram_total = ram_avail = parse_size(ov.ram)
    else:
        vm = psutil.virtual_memory()
        ram_total, ram_avail = int(vm.total), int(vm.available)
    notes: list[str] = []
    pool = None
    if ov.cpu_only:
        gpus: list[GPU] = []
    elif ov.gpu_mem:
        bw = ov.gpu_bw * 1e9 if ov.gpu_bw else DEFAULT_GPU_BW
        gpus = [GPU(i, f"GPU{i} ({gib(size, 0)}, given)", size, size, bw)
                for i, size in enumerate(parse_sizes(ov.gpu_mem))]
        gpus = [replace(g, device=r[0], op_offload=False) for g, r in zip(gpus, rpc_devices)] + gpus[
            len(rpc_devices):]
    else:
        from glmlocal.plan.devices import local_gpus

        gpus, pool, notes = local_gpus(ram_total, nvml=nvml, env=env, devices=devices)
        if ov.gpu_bw:
            gpus = [replace(g, bandwidth=ov.gpu_bw * 1e9) for g in gpus]
        gpus = rpc_gpus(rpc_devices, ov.gpu_bw) + [replace(g, device=g.device_name) for g in gpus]
    cores = ov.threads or physical_cores()
    if not ov.threads and ov.ram:  # planning for another machine: our core count says little about it
        notes.append(f"threads {cores} (this machine's physical cores); set --threads for the machine you plan for")
    cpu_bw = _cpu_bandwidth(ov, cores, cpu_bw_probe, notes)
    label = "the planned machine" if ov.gpu_mem or ov.ram else "this machine"
    return Hardware(tuple(gpus), ram_total, ram_avail, cores, cpu_bw, tuple(notes), pool, label)


def register_rpc(endpoints: Sequence[str]) -> tuple[RpcDevice, ...]:
    """Register llama.cpp RPC servers; (device name, free, total) of each device they offer."""
    from glmlocal.llama import ggml, rpc

    names = [n for e in endpoints for n in rpc.add_rpc_server(e)]
    mem = {d.name: (d.free_bytes, d.total_bytes) for d in ggml.devices()}
    return tuple((n, *mem[n]) for n in names)


def rpc_gpus(rpc_devices: Sequence[RpcDevice], gpu_bw_gbs: float | None = None) -> list[GPU]:
    """GPUs for llama.cpp RPC devices ((name, free, total) each). Their backend has no op offload; their
    bandwidth is unknown from here (the server may be a CPU or a GPU): --gpu-bw, else a DDR5 desktop's."""
    bw = gpu_bw_gbs * 1e9 if gpu_bw_gbs else DEFAULT_CPU_BW
    return [GPU(i, f"{name} (RPC)", total, free, bw, device=name, op_offload=False)
            for i, (name, free, total) in enumerate(rpc_devices)]


def _cpu_bandwidth(ov: PlanOptions, cores: int, cpu_bw_probe, notes: list[str]) -> float:
    if ov.cpu_bw:
        return ov.cpu_bw * 1e9
    if ov.ram:  # planning for another machine: our own RAM speed says nothing about it
        notes.append("CPU memory bandwidth assumed 89.6 GB/s (dual-channel DDR5-5600); set --cpu-bw")
        return DEFAULT_CPU_BW
    if cpu_bw_probe is not None:
        bw = cpu_bw_probe(cores)
    else:
        bw = cached_cpu_bandwidth(cores)
    notes.append(f"CPU memory bandwidth measured: {bw / 1e9:.0f} GB/s ({cores}-thread copy)")
    return bw


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cached_cpu_bandwidth(cores: int) -> float:
    """measure_cpu_bandwidth, remembered per CPU model and thread count in the store directory.

    Measuring takes a quarter of a second on an idle machine but several seconds on a busy one, and
    every `plan`/`chat`/`serve` start needs the figure; the hardware doesn't change between runs.
    """
    import json

    from glmlocal.models.store import atomic_write_text, home

    path = home() / "hardware-cache.json"
    key = f"{_cpu_model()}|{cores}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key])
    bw = measure_cpu_bandwidth(cores)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**cache, key: bw}))
    except OSError:
        pass  # a read-only store only costs the next run another measurement
    return bw
