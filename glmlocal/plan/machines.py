"""Named machine profiles (machines.toml next to models.toml) -> the Hardware the planner plans for.

Profiles are data: memory, the GPU's share of it, bandwidths, backend. A profile with a missing or mistyped
field is one InputError line naming it; an unknown name lists the known ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from glmlocal.errors import InputError
from glmlocal.plan.hardware import GIB, GPU, Hardware
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.unified import RAISE_METAL, RAISE_TTM, UnifiedMemory, macos_headroom

MACHINES_PATH = Path(__file__).resolve().parent.parent / "machines.toml"  # glmlocal/machines.toml
MIB = 1024**2
BACKENDS = {"metal": "MTL", "cuda": "CUDA", "hip": "ROCm", "vulkan": "Vulkan"}  # -> llama.cpp device prefix
_COMMON = {"display": str, "backend": str, "memory_gib": float, "cpu_bandwidth_gbs": float, "cores": int}
_UNIFIED = {"gpu_limit_gib": float, "gpu_bandwidth_gbs": float}
_GPU = {"name": str, "vram_mib": int, "bandwidth_gbs": float}


@dataclass(frozen=True)
class MachineGPU:
    name: str
    vram: int  # bytes
    bandwidth: float  # bytes/s


@dataclass(frozen=True)
class Machine:
    """One profile, in bytes and bytes/s."""

    name: str
    display: str
    backend: str
    memory: int
    cpu_bandwidth: float
    cores: int
    source: str = ""
    unified: bool = False
    gpu_limit: int = 0
    gpu_limit_max: int = 0
    gpu_bandwidth: float = 0.0
    gpus: tuple[MachineGPU, ...] = ()

    def hardware(self) -> Hardware:
        """The Hardware this profile describes: its GPUs whole and free, all of its RAM available."""
        prefix = BACKENDS[self.backend]
        note = f"machine profile {self.name}: {self.display} ({self.source or 'machines.toml'})"
        label = f"the planned machine ({self.name})"
        if not self.unified:
            gpus = tuple(GPU(i, g.name, g.vram, g.vram, g.bandwidth, device=f"{prefix}{i}")
                         for i, g in enumerate(self.gpus))
            return Hardware(gpus, self.memory, self.memory, self.cores, self.cpu_bandwidth, (note,), label=label)
        gpu = GPU(0, self.display, self.gpu_limit, self.gpu_limit, self.gpu_bandwidth, device=f"{prefix}0",
                  unified=True)
        return Hardware((gpu,), self.memory, self.memory, self.cores, self.cpu_bandwidth, (note,), self.pool(), label)

    def pool(self) -> UnifiedMemory:
        source = {"metal": "Metal working set", "cuda": "CUDA on an integrated GPU (the whole pool)"}.get(
            self.backend, "GTT")
        raise_how = {"metal": RAISE_METAL, "vulkan": RAISE_TTM, "hip": RAISE_TTM}.get(self.backend, "")
        return UnifiedMemory(self.memory, self.gpu_limit, source, self.gpu_limit_max if raise_how else 0, raise_how)


def _field(where: str, entry: dict, key: str, kind: type, default=None):
    """entry[key] as `kind`; InputError naming the field when it is missing or of the wrong type."""
    if key not in entry:
        if default is not None:
            return default
        raise InputError(f"{where} has no {key!r}", hint=f"add {key} = ... (see the comment at the top of the file)")
    value = entry[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
    if not ok or (kind in (int, float) and value <= 0):
        raise InputError(f"{where}: {key} must be a positive {'number' if kind is float else kind.__name__}, "
                         f"got {value!r}")
    return value


def _machine(name: str, entry: dict, path: Path) -> Machine:
    where = f"{path.name}: machine {name!r}"
    v = {k: _field(where, entry, k, t) for k, t in _COMMON.items()}
    if v["backend"] not in BACKENDS:
        raise InputError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {v['backend']!r}")
    unified = _field(where, entry, "unified", bool, False)
    common = dict(name=name, display=v["display"], backend=v["backend"], memory=int(v["memory_gib"] * GIB),
                  cpu_bandwidth=v["cpu_bandwidth_gbs"] * 1e9, cores=v["cores"], source=entry.get("source", ""))
    if unified:
        u = {k: _field(where, entry, k, t) for k, t in _UNIFIED.items()}
        limit, memory = int(u["gpu_limit_gib"] * GIB), common["memory"]
        default_max = memory - (macos_headroom(memory) if v["backend"] == "metal" else 4 * GIB)
        top = entry.get("gpu_limit_max_gib")
        limit_max = int(_field(where, entry, "gpu_limit_max_gib", float) * GIB) if top is not None else default_max
        return Machine(**common, unified=True, gpu_limit=limit, gpu_limit_max=max(limit_max, limit),
                       gpu_bandwidth=u["gpu_bandwidth_gbs"] * 1e9)
    gpus = entry.get("gpus")
    if not isinstance(gpus, list) or not gpus:
        raise InputError(f"{where} has no 'gpus'", hint="add gpus = [{ name = ..., vram_mib = ..., "
                         "bandwidth_gbs = ... }], or unified = true with gpu_limit_gib and gpu_bandwidth_gbs")
    parsed = []
    for i, g in enumerate(gpus):
        w = f"{where} gpus[{i}]"
        if not isinstance(g, dict):
            raise InputError(f"{w} must be a table {{ name, vram_mib, bandwidth_gbs }}")
        f = {k: _field(w, g, k, t) for k, t in _GPU.items()}
        parsed.append(MachineGPU(f["name"], f["vram_mib"] * MIB, f["bandwidth_gbs"] * 1e9))
    return Machine(**common, gpus=tuple(parsed))


def load_machines(path: Path = MACHINES_PATH) -> dict[str, Machine]:
    """Every profile in `path`, by name (InputError naming the first bad field)."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read machine profiles {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path.name} is not valid TOML: {e}") from None
    entries = doc.get("machines")
    if not isinstance(entries, dict) or not entries:
        raise InputError(f"{path.name} has no [machines.<name>] entries")
    return {name: _machine(name, entry, path) for name, entry in entries.items()}


@lru_cache(maxsize=1)
def machines() -> dict[str, Machine]:
    """The shipped profiles (read once)."""
    return load_machines()


def get_machine(name: str, profiles: dict[str, Machine] | None = None) -> Machine:
    """A profile by name (case-insensitive); InputError listing the known names otherwise."""
    profiles = machines() if profiles is None else profiles
    found = {k.lower(): m for k, m in profiles.items()}.get(name.strip().lower())
    if found is None:
        from glmlocal.models.registry import did_you_mean

        near = did_you_mean(name, {k.lower(): k for k in profiles})
        raise InputError(f"unknown machine {name!r}{near}", hint=f"known machines: {', '.join(profiles)}")
    return found


def machine_hardware(options: PlanOptions) -> Hardware:
    """The Hardware of options.machine, with --threads / --gpu-bw / --cpu-bw applied; options that describe this
    machine (--gpu-mem, --ram, --cpu-only, --rpc) make no sense with a profile and are refused."""
    clash = [flag for flag, value in (("--gpu-mem", options.gpu_mem), ("--ram", options.ram),
                                      ("--cpu-only", options.cpu_only), ("--rpc", options.rpc)) if value]
    if clash:
        raise InputError(f"--machine describes the whole machine: drop {', '.join(clash)}")
    hw = get_machine(options.machine or "").hardware()
    if options.gpu_bw:
        hw = replace(hw, gpus=tuple(replace(g, bandwidth=options.gpu_bw * 1e9) for g in hw.gpus))
    if options.cpu_bw:
        hw = replace(hw, cpu_bandwidth=options.cpu_bw * 1e9)
    if options.threads:
        hw = replace(hw, cores=options.threads)
    return hw
