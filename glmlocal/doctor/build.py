"""Build flags for llama-cpp-python on this machine. Standard library only: `python -m glmlocal.doctor
--cmake-args` runs before llama-cpp-python or glmlocal's dependencies are installed.
"""

from __future__ import annotations

from pathlib import Path

PKG = "llama-cpp-python==0.3.36"
# /proc/cpuinfo flag -> ggml CMake option. AMX stays off: a build using it crashed on quantized GGUFs on CPUs
# that advertise it. AVX_VNNI (VEX) is separate from AVX512_VNNI: AMD Zen 4 has only the latter, and a build
# with -DGGML_AVX_VNNI=ON dies with SIGILL in llamafile_sgemm ({vex} vpdpbusd) on Q8_0/Q5_0 weights there.
CPU_FLAG_OPTIONS = [("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
                    ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
                    ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16"),
                    ("avx512vbmi", "GGML_AVX512_VBMI")]
CUDA_CMAKE_ARGS = "-DGGML_CUDA=on"
# The RPC backend (one small library) lets `--rpc HOST:PORT` use another machine's memory as a device, and lets
# the test suite exercise the multi-device (GPU) placement path on a machine without a GPU.
RPC_CMAKE_ARGS = "-DGGML_RPC=ON"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags the kernel reports (empty when unknown, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
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


def cpu_cmake_args(flags: set[str] | None = None) -> str:
    """CMAKE_ARGS for a portable (non -march=native) build using exactly the ISA extensions this CPU has."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return f"-DGGML_NATIVE=OFF {RPC_CMAKE_ARGS}"
    opts = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in CPU_FLAG_OPTIONS]
    return " ".join(["-DGGML_NATIVE=OFF", *opts, RPC_CMAKE_ARGS])


def rebuild_command(cmake_args: str) -> str:
    """The pip command that rebuilds llama-cpp-python from source with `cmake_args`, never from a cached wheel."""
    return (f'CMAKE_ARGS="{cmake_args}" pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python '
            f'"{PKG}"')
