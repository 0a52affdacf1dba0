"""Unified memory: machines whose GPU and CPU share one pool of RAM, and the OS limit on the GPU's share.

Which devices (pure, from what llama.cpp's backend registry says about a device):
- Metal (Apple Silicon): ggml calls it a GPU, but it is always unified. Its total is recommendedMaxWorkingSetSize,
  the working set macOS lets the GPU wire: about 2/3 of RAM on 2023 macOS, 3/4 on macOS 14/15 (96 GiB of 128 GiB),
  84% on macOS 26 (107.52 GiB of 128 GiB), 464 GiB of 512 GiB on an M3 Ultra. `sudo sysctl iogpu.wired_limit_mb=N`
  raises it until the next reboot (114688 MiB on 128 GiB gives 112.00 GiB: antirez/ds4#893).
- Integrated GPUs (ggml type IGPU): CUDA's prop.integrated (DGX Spark's GB10, whose NVML reports no memory at all:
  NVIDIA's known issue "nvidia-smi reports Memory-Usage: Not Supported"), Vulkan's integrated devices (AMD Strix
  Halo, where the total is every heap: the GTT pool plus the BIOS carve-out).
- AMD APUs under ROCm (gfx1151 ...): HIP reports only the BIOS carve-out.

The GPU limit on Linux APUs is the GTT size: max(3 GiB, RAM/2) by default (amdgpu "Adjust logic around GTT size
(v3)", 2022), raised with the kernel parameter ttm.pages_limit (4 KiB pages; amdgpu.gttsize is deprecated).
Parsers here read the outputs people post (sysctl, llama.cpp's Metal log, /proc/cmdline, /proc/meminfo); the
tests feed them outputs recorded on real machines (tests/data/machines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2
PAGE = 4096  # ttm.pages_limit counts 4 KiB pages
# How to raise the GPU limit; {mib} and {pages} are the new limit.
RAISE_METAL = "sudo sysctl iogpu.wired_limit_mb={mib} (until reboot)"
RAISE_TTM = "kernel parameters ttm.pages_limit={pages} ttm.page_pool_size={pages} (then reboot)"
METAL_FALLBACK = 0.75  # of RAM, only when the working set cannot be queried (macOS 14/15's ratio)
# Ryzen AI Max APUs (gfx1151) by the GPU names HIP/Vulkan report, in case a backend calls them "GPU":
# Radeon 8060S (Strix Halo), 8050S / 8065S (unslothai/unsloth#7290).
APU_NAMES = ("Radeon 8060S", "Radeon 8050S", "Radeon 8065S", "STRIX_HALO", "GFX1151")


@dataclass(frozen=True)
class UnifiedMemory:
    """The pool CPU and GPU share and the OS limit on the GPU's part of it (bytes)."""

    pool: int  # physical RAM
    gpu_limit: int  # what the GPU may use now
    limit_source: str  # what sets gpu_limit, in words
    limit_max: int = 0  # the most the limit may be raised to (0: it cannot be raised)
    raise_how: str = ""  # RAISE_METAL / RAISE_TTM, or "" when there is no knob

    def raise_command(self, limit: int) -> str:
        """The command that sets the GPU limit to `limit` bytes (rounded up to a whole GiB)."""
        mib = -(-limit // GIB) * 1024
        return self.raise_how.format(mib=mib, pages=mib * MIB // PAGE)


def macos_headroom(pool: int) -> int:
    """What to leave macOS when raising the GPU limit: an eighth of RAM, at least 8 GiB (16 GiB of 128 GiB is
    the 114688 MiB people set on 128 GiB Macs, ds4#893)."""
    return max(8 * GIB, pool // 8)


def is_unified(name: str, description: str, dev_type: str, backend: str = "") -> bool:
    """Whether a llama.cpp device shares the host's memory (see the module docstring)."""
    if backend == "Metal" or name.startswith("MTL") or dev_type == "IGPU":
        return True
    return "GB10" in description or any(n in description for n in APU_NAMES)


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------
def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl a b` output ("a: value" per line) -> {name: value}; other lines are ignored."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([a-z][\w.]*)\s*:\s*(\S+)", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def parse_working_set(log: str) -> int | None:
    """recommendedMaxWorkingSetSize from llama.cpp's Metal log in bytes: this llama.cpp prints value/1e6 as
    "MB" ("= 115448.73 MB"); ds4 prints GiB ("107.52 GiB"). (Before 2024 ggml printed MiB labelled "MB".)"""
    m = re.search(r"recommendedMaxWorkingSetSize\s*[=:]\s*([\d.]+)\s*(MB|GiB)", log)
    if not m:
        return None
    return round(float(m.group(1)) * (1e6 if m.group(2) == "MB" else GIB))


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo (0 when a line is missing)."""
    vals = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^\s*(\w+):\s+(\d+) kB", text, re.M)}
    return vals.get("MemTotal", 0), vals.get("MemAvailable", 0)


def parse_kernel_params(cmdline: str) -> dict[str, str]:
    """Kernel parameters (key=value) from /proc/cmdline or a modprobe.d line ("options ttm pages_limit=N")."""
    out = {}
    for line in cmdline.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = line.split()
        prefix = f"{words[1]}." if len(words) > 2 and words[0] == "options" else ""
        for word in words:
            key, eq, value = word.partition("=")
            if eq:
                out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The limit per platform
# ---------------------------------------------------------------------------------------------
def metal_memory(pool: int, working_set: int | None = None, wired_limit_mb: int = 0) -> UnifiedMemory:
    """A Mac's pool and Metal limit: the working set llama.cpp reports, else iogpu.wired_limit_mb when set
    (0 means the macOS default), else 3/4 of RAM."""
    if working_set:
        limit, source = working_set, "Metal recommendedMaxWorkingSetSize"
    elif wired_limit_mb > 0:
        limit, source = wired_limit_mb * MIB, f"iogpu.wired_limit_mb={wired_limit_mb}"
    else:
        limit, source = int(pool * METAL_FALLBACK), "assumed 3/4 of RAM (the working set could not be queried)"
    return UnifiedMemory(pool, limit, source, max(pool - macos_headroom(pool), limit), RAISE_METAL)


def gtt_limit(pool: int, params: dict[str, str] | None = None, gtt_total: int | None = None) -> tuple[int, str]:
    """(bytes, source) of an AMD APU's GTT: sysfs mem_info_gtt_total when readable, else the kernel parameters
    ttm.pages_limit (4 KiB pages) / amdgpu.gttsize (MiB), else the kernel default max(3 GiB, RAM/2)."""
    params = params or {}
    if gtt_total:
        return gtt_total, "GTT (mem_info_gtt_total)"
    if params.get("ttm.pages_limit", "").isdigit():
        return min(int(params["ttm.pages_limit"]) * PAGE, pool), f"GTT (ttm.pages_limit={params['ttm.pages_limit']})"
    if params.get("amdgpu.gttsize", "").lstrip("-").isdigit() and int(params["amdgpu.gttsize"]) > 0:
        return min(int(params["amdgpu.gttsize"]) * MIB, pool), f"GTT (amdgpu.gttsize={params['amdgpu.gttsize']})"
    return max(3 * GIB, pool // 2), "GTT kernel default (half of RAM)"


def apu_memory(pool: int, limit: int, source: str) -> UnifiedMemory:
    """An AMD APU's pool and GPU limit; raising it leaves the OS 4 GiB (124 GiB of 128 GiB, as the
    amd-strix-halo-toolboxes README sets ttm.pages_limit=32505856)."""
    return UnifiedMemory(pool, limit, source, max(pool - 4 * GIB, limit), RAISE_TTM)


def spark_memory(pool: int, limit: int) -> UnifiedMemory:
    """DGX Spark (GB10): CUDA may allocate the whole pool (free = MemAvailable in this llama.cpp): no knob."""
    return UnifiedMemory(pool, limit, "CUDA on an integrated GPU (the whole pool)")
