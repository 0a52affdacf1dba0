#!/usr/bin/env bash
# Print CMAKE_ARGS for a CPU-only llama.cpp build matching this CPU's instruction sets.
# Why: -march=native crashes on quantized GGUFs on CPUs that advertise AMX, and a fixed flag list
# crashes (SIGILL) where a listed extension is missing (e.g. AVX_VNNI on AMD EPYC, which has only
# AVX512_VNNI). So build with GGML_NATIVE=OFF and turn on exactly the extensions /proc/cpuinfo lists.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
args="-DGGML_NATIVE=OFF"
add() { case "$flags" in *" $1 "*) args="$args -DGGML_$2=ON" ;; *) args="$args -DGGML_$2=OFF" ;; esac; }
add avx AVX
add avx2 AVX2
add fma FMA
add f16c F16C
add bmi2 BMI2
add avx512f AVX512
add avx512vbmi AVX512_VBMI
add avx512_vnni AVX512_VNNI
add avx512_bf16 AVX512_BF16
add avx_vnni AVX_VNNI
echo "$args"
