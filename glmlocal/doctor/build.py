"""Build flags for llama-cpp-python on this machine. Standard library only: `python -m glmlocal.doctor
--cmake-args` runs before llama-cpp-python or glmlocal's dependencies are installed.

`choose_build()` picks the backend the machine can build and use, in this order:
- Metal on Apple Silicon (macOS on arm64; llama-cpp-python turns Metal on there by itself, we say it);
- CUDA when the CUDA toolkit (nvcc) is installed and nvidia-smi lists a GPU, for exactly that GPU's compute
  capability (-DCMAKE_CUDA_ARCHITECTURES from `nvidia-smi --query-gpu=name,compute_cap`);
- HIP when ROCm's compiler (hipconfig / hipcc) is installed and rocminfo lists a GPU agent, for its gfx target;
- Vulkan when only a Vulkan shader compiler (glslc, from the Vulkan SDK or distribution packages) is present;
- otherwise the CPU.
Every build keeps the CPU flags of this CPU (x86: the ISA extensions /proc/cpuinfo lists, never -march=native;
arm64 Linux: an -march built from the Features line) and the RPC backend. Probes go through an injectable
`Probe` (command runner, file reader, platform), so tests feed it outputs recorded on real machines.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PKG = "llama-cpp-python==0.3.36"
# /proc/cpuinfo flag -> ggml CMake option. AMX stays off: a build using it crashed on quantized GGUFs on CPUs
# that advertise it. AVX_VNNI (VEX) is separate from AVX512_VNNI: AMD Zen 4 has only the latter, and a build
# with -DGGML_AVX_VNNI=ON dies with SIGILL in llamafile_sgemm ({vex} vpdpbusd) on Q8_0/Q5_0 weights there.
CPU_FLAG_OPTIONS = [("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
                    ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
                    ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16"),
                    ("avx512vbmi", "GGML_AVX512_VBMI")]
# arm64 /proc/cpuinfo Features -> (-march extension, the first architecture version ggml pairs it with in its
# own GGML_CPU_ALL_VARIANTS table): asimddp = dot product, asimdhp = FP16 vector arithmetic.
ARM_FEATURES = [("asimddp", "dotprod", "armv8.2-a"), ("asimdhp", "fp16", "armv8.2-a"), ("sve", "sve", "armv8.2-a"),
                ("i8mm", "i8mm", "armv8.6-a"), ("sve2", "sve2", "armv8.6-a"), ("sme", "sme", "armv9.2-a")]
_ARM_ORDER = ["armv8-a", "armv8.2-a", "armv8.6-a", "armv9.2-a"]
CUDA_CMAKE_ARGS = "-DGGML_CUDA=on"
HIP_CMAKE_ARGS = "-DGGML_HIP=on"
METAL_CMAKE_ARGS = "-DGGML_METAL=on"
VULKAN_CMAKE_ARGS = "-DGGML_VULKAN=on"
# The RPC backend (one small library) lets `--rpc HOST:PORT` use another machine's memory as a device, and lets
# the test suite exercise the multi-device (GPU) placement path on a machine without a GPU.
RPC_CMAKE_ARGS = "-DGGML_RPC=ON"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags the kernel reports: x86 `flags`, arm64 `Features` (empty when unknown, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


# llama_print_system_info feature name -> /proc/cpuinfo flag
SYSINFO_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "FMA": "fma",
                 "F16C": "f16c", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                 "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}


def unsupported_features(system_info: str, flags: set[str]) -> list[str]:
    """Instruction sets the llama.cpp build uses (`X = 1` in its system info) that this CPU lacks."""
    if not flags:
        return []
    used = [name for name, val in (part.strip().rsplit("=", 1) for part in system_info.replace("CPU :", "").split("|")
                                   if "=" in part) if val.strip() == "1"]
    return [u.strip() for u in used if u.strip() in SYSINFO_FLAGS and SYSINFO_FLAGS[u.strip()] not in flags]


def arm_march(flags: set[str]) -> str:
    """-march for an arm64 CPU from its Features: the lowest architecture that carries every extension it has."""
    tags = [(tag, arch) for feature, tag, arch in ARM_FEATURES if feature in flags]
    base = max((arch for _, arch in tags), key=_ARM_ORDER.index, default="armv8-a")
    return base + "".join(f"+{tag}" for tag, _ in tags)


def cpu_cmake_args(flags: set[str] | None = None) -> str:
    """CMAKE_ARGS for a portable (non -march=native) build using exactly the ISA extensions this CPU has."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return f"-DGGML_NATIVE=OFF {RPC_CMAKE_ARGS}"
    if "asimd" in flags:  # arm64: ggml takes one -march instead of per-extension options
        return f"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH={arm_march(flags)} {RPC_CMAKE_ARGS}"
    opts = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in CPU_FLAG_OPTIONS]
    return " ".join(["-DGGML_NATIVE=OFF", *opts, RPC_CMAKE_ARGS])


def rebuild_command(cmake_args: str) -> str:
    """The pip command that rebuilds llama-cpp-python from source with `cmake_args`, never from a cached wheel."""
    return (f'CMAKE_ARGS="{cmake_args}" pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python '
            f'"{PKG}"')


# ---------------------------------------------------------------------------------------------
# Which GPU toolkit and GPU this machine has
# ---------------------------------------------------------------------------------------------
def _run(argv: list[str]) -> str | None:
    """stdout of a command; None when it is missing, fails or hangs (a wedged driver must not stop an install)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


@dataclass
class Probe:
    """What choose_build() may look at; each part is replaceable (tests use recorded outputs)."""

    run: Callable[[list[str]], str | None] = _run
    which: Callable[[str], str | None] = shutil.which
    read: Callable[[str], str | None] = _read
    paths: Callable[[str], list[str]] = field(default=lambda pattern: sorted(glob.glob(pattern)))
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def find_nvcc(p: Probe) -> str | None:
    """nvcc on PATH, under $CUDA_HOME / $CUDA_PATH, or the newest /usr/local/cuda*/bin/nvcc (DGX Spark ships it
    in /usr/local/cuda-13.0, which a non-login shell's PATH lacks)."""
    hit = p.which("nvcc")
    if hit:
        return hit
    roots = [p.env[k] for k in ("CUDA_HOME", "CUDA_PATH") if p.env.get(k)] + ["/usr/local/cuda"]
    found = [f"{r}/bin/nvcc" for r in roots if p.paths(f"{r}/bin/nvcc")]
    found += sorted(p.paths("/usr/local/cuda-*/bin/nvcc"), key=_version_key)[::-1]
    return found[0] if found else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def parse_compute_caps(csv: str) -> list[tuple[str, str]]:
    """(GPU name, compute capability) per line of `nvidia-smi --query-gpu=...compute_cap... --format=csv`.

    Takes the header or no header and extra columns: the capability is the one field shaped N.N, the name the
    first field. "[N/A]" memory columns (DGX Spark's GB10 reports no memory) do not hide the GPU.
    """
    out = []
    for line in csv.splitlines():
        fields = [f.strip() for f in line.split(",")]
        caps = [f for f in fields if re.fullmatch(r"\d+\.\d+", f)]
        if fields[0] and caps and "compute_cap" not in line:
            out.append((fields[0], caps[0]))
    return out


def nvidia_gpus(p: Probe) -> list[tuple[str, str]]:
    """(name, compute capability) of each NVIDIA GPU nvidia-smi lists; capability "" when the driver cannot say."""
    smi = p.which("nvidia-smi")
    if not smi:
        return []
    caps = parse_compute_caps(p.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"]) or "")
    if caps:
        return caps
    listing = p.run([smi, "-L"]) or ""  # drivers older than the compute_cap field still list the GPUs
    return [(m.group(1).strip(), "") for m in re.finditer(r"^GPU \d+: (.+?)(?: \(UUID.*)?$", listing, re.M)]


def parse_rocminfo(text: str) -> list[tuple[str, str]]:
    """(gfx target, marketing name) of each GPU agent rocminfo lists (the CPU is an agent too: skipped)."""
    out, name, marketing = [], "", ""
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "Name":
            name, marketing = value, ""
        elif key == "Marketing Name":
            marketing = value
        elif key == "Device Type" and value == "GPU" and name.startswith("gfx"):
            out.append((name, marketing))
    return out


def rocm_tool(p: Probe, name: str) -> str | None:
    """A ROCm program on PATH or in $ROCM_PATH/bin (default /opt/rocm/bin)."""
    hit = p.which(name)
    root = p.env.get("ROCM_PATH", "/opt/rocm")
    return hit or next(iter(p.paths(f"{root}/bin/{name}")), None)


def apple_silicon(p: Probe) -> bool:
    """macOS on an Apple chip, also when this Python runs as x86_64 under Rosetta (hw.optional.arm64 says 1)."""
    if p.system != "Darwin":
        return False
    return p.machine == "arm64" or (p.run(["sysctl", "-n", "hw.optional.arm64"]) or "").strip() == "1"


# ---------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildChoice:
    """The backend to build, its CMAKE_ARGS, and why (one line for the user)."""

    backend: str  # "metal", "cuda", "hip", "vulkan" or "cpu"
    args: str
    reason: str


def choose_build(p: Probe | None = None) -> BuildChoice:
    """The llama-cpp-python build for this machine (see the module docstring for the order)."""
    p = p or Probe()
    if apple_silicon(p):
        rosetta = " (this Python runs under Rosetta: use an arm64 Python)" if p.machine != "arm64" else ""
        return BuildChoice("metal", f"{METAL_CMAKE_ARGS} {RPC_CMAKE_ARGS}",
                           f"Metal: Apple Silicon (macOS on arm64){rosetta}; no x86 ISA flags")
    cpu = cpu_cmake_args(cpu_flags(p.read("/proc/cpuinfo") or ""))
    nvcc, gpus = find_nvcc(p), nvidia_gpus(p)
    if nvcc and gpus:
        return _cuda(cpu, nvcc, gpus, p)
    hip, agents = rocm_tool(p, "hipconfig") or rocm_tool(p, "hipcc"), _amd_gpus(p)
    if hip and agents:
        targets = list(dict.fromkeys(t for t, _ in agents))
        names = ", ".join(f"{m or t} ({t})" for t, m in agents)
        return BuildChoice("hip", f"{HIP_CMAKE_ARGS} -DGPU_TARGETS={';'.join(targets)} {cpu}",
                           f"HIP: ROCm ({hip}) and rocminfo lists {names}")
    glslc = p.which("glslc")
    if glslc:
        return BuildChoice("vulkan", f"{VULKAN_CMAKE_ARGS} {cpu}", f"Vulkan: glslc ({glslc}) found, "
                           "no CUDA toolkit with an NVIDIA GPU, no ROCm with an AMD GPU")
    return BuildChoice("cpu", cpu, _cpu_reason(nvcc, gpus, hip, agents))


def _amd_gpus(p: Probe) -> list[tuple[str, str]]:
    rocminfo = rocm_tool(p, "rocminfo")
    return parse_rocminfo(p.run([rocminfo]) or "") if rocminfo else []


def _cuda(cpu: str, nvcc: str, gpus: list[tuple[str, str]], p: Probe) -> BuildChoice:
    archs = sorted({cap.replace(".", "") for _, cap in gpus if cap}, key=int)
    args = [CUDA_CMAKE_ARGS]
    if archs:  # 12.0 / 12.1 stay plain: ggml's CMake turns them into the 120a / 121a it needs for FP4
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
    if not p.which("nvcc"):  # found off PATH: tell CMake where it is
        args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    names = ", ".join(f"{n} ({c})" if c else n for n, c in gpus)
    arch = (f"compute capability {', '.join(dict.fromkeys(c for _, c in gpus if c))}" if archs
            else "llama.cpp's default architectures (the driver does not report compute_cap)")
    return BuildChoice("cuda", " ".join([*args, cpu]), f"CUDA for {arch}: nvcc ({nvcc}) and nvidia-smi lists {names}")


def _cpu_reason(nvcc: str | None, gpus: list, hip: str | None, agents: list) -> str:
    if gpus:
        return (f"CPU: nvidia-smi lists {gpus[0][0]} but no CUDA toolkit (nvcc) was found; install it "
                "(or put its bin/ on PATH) for a CUDA build")
    if agents:
        return f"CPU: rocminfo lists {agents[0][0]} but no ROCm compiler (hipconfig/hipcc); install ROCm's HIP SDK"
    if nvcc:
        return f"CPU: nvcc ({nvcc}) found but nvidia-smi lists no GPU"
    if hip:
        return "CPU: ROCm found but rocminfo lists no GPU agent (is this user in the render and video groups?)"
    return "CPU: no GPU toolkit found (nvcc with an NVIDIA GPU, ROCm with an AMD GPU, Vulkan's glslc)"
