"""This machine's GPUs as llama.cpp will use them, and the unified-memory pool when a GPU shares RAM.

The devices come from llama.cpp's backend registry (glmlocal.llama.ggml.devices: name, description, type, the
free and total memory its backend reports), in the order llama.cpp offloads to them. NVML adds, for CUDA
devices, what only it knows: bandwidth from memory clock x bus width, the UUID, and the CUDA_VISIBLE_DEVICES
mapping (CUDA{i} is NVML's i-th visible GPU). A build without a GPU backend leaves NVML's list (the doctor says
to rebuild). RPC devices are not local: hardware.probe adds them from the servers it registered.
"""

from __future__ import annotations

import glob
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

from glmlocal.plan.hardware import GPU, _read_text, gpu_bandwidth, probe_gpus
from glmlocal.plan.unified import (
    UnifiedMemory,
    apu_memory,
    gtt_limit,
    is_unified,
    metal_memory,
    parse_kernel_params,
    parse_sysctl,
    spark_memory,
)
from glmlocal.plan.view import gib

if TYPE_CHECKING:
    from glmlocal.llama.ggml import Device

Reader = Callable[[str], "str | None"]
Runner = Callable[[list[str]], "str | None"]


def _run(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def registry_devices(notes: list[str]) -> list[Device]:
    """Every device in llama.cpp's backend registry ([] with a note when llama.cpp cannot be loaded)."""
    try:
        from glmlocal.llama import ggml

        return ggml.devices()
    except Exception as e:  # noqa: BLE001 (a broken or missing build must not stop planning)
        notes.append(f"llama.cpp's device list could not be read ({type(e).__name__}: {e}); `glmlocal doctor`")
        return []


def offload_targets(devs: list[Device]) -> list[Device]:
    """The local devices llama.cpp offloads to by default, in its order (RPC devices left out)."""
    from glmlocal.llama.ggml import gpu_devices

    return [d for d in gpu_devices(devs) if d.backend != "RPC" and not d.name.startswith("RPC")]


def local_gpus(ram_total: int, *, nvml=None, env: dict | None = None, devices: list[Device] | None = None,
               read: Reader = _read_text, run: Runner = _run) -> tuple[list[GPU], UnifiedMemory | None, list[str]]:
    """(GPUs in llama.cpp's order, the unified pool if one of them shares RAM, notes). `devices`, `nvml`,
    `read` (files) and `run` (commands) may be injected: the tests use outputs recorded on real machines."""
    nv, notes = probe_gpus(nvml, env, read)
    targets = offload_targets(registry_devices(notes) if devices is None else devices)
    if targets:
        gpus = [_from_registry(i, d, nv) for i, d in enumerate(targets)]
    else:
        gpus = nv
        if nv:
            notes.append("this llama.cpp build has no GPU backend: nothing will be offloaded until it is rebuilt "
                         "(`glmlocal doctor` prints the command)")
    shared = next((g for g in gpus if g.unified), None)
    pool = _pool(shared, ram_total, read, run, notes) if shared else None
    return gpus, pool, notes


def _from_registry(i: int, d: Device, nv: list[GPU]) -> GPU:
    """GPU i from a registry device; a CUDA device takes NVML's bandwidth and UUID (same CUDA index)."""
    match = None
    if d.name.startswith("CUDA") and d.name[4:].isdigit() and int(d.name[4:]) < len(nv):
        match = nv[int(d.name[4:])]
    bandwidth = match.bandwidth if match else gpu_bandwidth(d.description)
    unified = is_unified(d.name, d.description, d.type, d.backend) or bool(match and match.unified)
    return GPU(i, d.description or d.name, d.total_bytes, d.free_bytes, bandwidth, match.uuid if match else "",
               device=d.name, unified=unified)


def _pool(g: GPU, ram_total: int, read: Reader, run: Runner, notes: list[str]) -> UnifiedMemory:
    """The shared pool and the GPU's limit in it, per platform (see glmlocal.plan.unified)."""
    if g.device_name.startswith("MTL"):
        sysctl = parse_sysctl(run(["sysctl", "hw.memsize", "iogpu.wired_limit_mb"]) or "")
        wired = int(sysctl.get("iogpu.wired_limit_mb", "0") or 0)
        if wired > 0:
            notes.append(f"iogpu.wired_limit_mb={wired} is set (0, the macOS default, lets Metal use less)")
        return metal_memory(int(sysctl.get("hw.memsize", ram_total)), g.total, wired)
    if "GB10" in g.name or g.device_name.startswith("CUDA"):
        return spark_memory(ram_total, g.total)
    gtt, how = gtt_limit(ram_total, parse_kernel_params(read("/proc/cmdline") or ""), _gtt_total(read))
    if g.device_name.startswith("ROCm"):
        notes.append(f"ROCm sees the {gib(g.total)} BIOS carve-out, not the {gib(gtt)} GTT "
                     f"({how}): the Vulkan build uses the GTT pool")
        return UnifiedMemory(ram_total, g.total, "ROCm: the BIOS carve-out")
    return apu_memory(ram_total, g.total, f"Vulkan heaps: {how} {gib(gtt)} + the BIOS carve-out")


def _gtt_total(read: Reader) -> int | None:
    """amdgpu's GTT size from sysfs (documented in amdgpu_gtt_mgr.c: mem_info_gtt_total), when readable."""
    for path in sorted(glob.glob("/sys/class/drm/card*/device/mem_info_gtt_total")):
        text = (read(path) or "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None
