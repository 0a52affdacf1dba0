"""glmlocal doctor: the smoke test runs a real tiny Q4_K_M model in a child; crashes and hangs in the child
are reported with the fix; the build is checked against this CPU's instruction sets and the GPUs present."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmlocal.doctor import checks as doctor
from glmlocal.doctor.build import (
    Probe,
    arm_march,
    choose_build,
    cpu_cmake_args,
    cpu_flags,
    parse_compute_caps,
    parse_rocminfo,
    unsupported_features,
)
from glmlocal.doctor.checks import ChildResult, backend_check, smoke_check
from glmlocal.plan.hardware import GPU, probe_gpus
from tests.cli_run import run_piped
from tests.recorded import block_after, recorded


def test_smoke_passes_with_the_installed_build():
    c = smoke_check()
    assert c.status == "ok", (c.detail, c.data)
    assert len(c.data["tokens"]) == 16 and c.data["finite_logits"]
    assert c.data["buffers"]["model"]  # llama.cpp really loaded the quantized weights


def test_a_crashing_child_is_caught_and_explained():
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    c = smoke_check(argv_factory=lambda tmp: crash)
    assert c.status == "fail" and "SIGSEGV" in c.detail and c.data["signal"] == "SIGSEGV"
    assert "--no-cache-dir" in c.fix and "-DGGML_NATIVE=OFF" in c.fix and "--no-binary llama-cpp-python" in c.fix


def test_a_hanging_or_failing_child_is_reported():
    hang = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert smoke_check(timeout=1, argv_factory=lambda tmp: hang).status == "fail"
    fail = [sys.executable, "-c", "raise SystemExit('boom: no model')"]
    c = smoke_check(argv_factory=lambda tmp: fail)
    assert c.status == "fail" and "boom: no model" in c.detail


def test_cmake_args_follow_the_cpu():
    zen4 = {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi"}
    args = cpu_cmake_args(zen4)
    assert "-DGGML_AVX_VNNI=OFF" in args and "-DGGML_AVX512_VNNI=ON" in args and "-DGGML_NATIVE=OFF" in args
    assert "-DGGML_AVX512=OFF" in cpu_cmake_args({"avx", "avx2", "fma", "f16c"})
    assert cpu_flags("processor : 0\nflags\t\t: fpu avx avx2\n") == {"fpu", "avx", "avx2"}


def test_build_features_missing_on_this_cpu_are_named():
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | AVX512 = 0 | LLAMAFILE = 1 |"
    assert unsupported_features(info, {"pni", "avx", "avx2"}) == ["AVX_VNNI"]
    assert unsupported_features(info, {"pni", "avx", "avx2", "avx_vnni"}) == []


def test_cpu_only_build_on_a_gpu_machine_prints_the_rebuild_for_its_backend(monkeypatch):
    """The rebuild command is the one choose_build makes for the machine: CUDA for its compute capability with
    the toolkit, HIP for an AMD GPU with ROCm (a GPU NVML never sees), the toolkit to install when it is missing."""
    monkeypatch.setattr(doctor, "cpu_flags", lambda *a: set())
    info = ChildResult({"backends": ["RPC", "CPU"], "system_info": "", "devices": []}, 0, None, False, "")
    gpu = GPU(0, "NVIDIA GeForce RTX 4090", 24 << 30, 23 << 30, 1e12)
    csv4090 = block_after("nvidia-smi-query-csv-rtx4090.txt", "$ nvidia-smi")
    cuda = choose_build(machine(tools=("nvcc", "nvidia-smi"), outputs={SMI: csv4090}))
    c = backend_check(info, [gpu], cuda)
    assert c.status == "fail" and "--force-reinstall" in c.fix and "nothing will be offloaded" in c.detail
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89 ' in c.fix
    ok = backend_check(ChildResult({"backends": ["CUDA", "CPU"], "system_info": "", "devices": []}, 0, None, False,
                                   ""), [gpu], cuda)
    assert ok.status == "ok"
    strix = recorded("rocminfo-strix-halo-gfx1151.txt")
    hip = choose_build(machine(tools=("hipconfig", "rocminfo"), outputs={"rocminfo": strix}))
    amd = backend_check(info, [], hip)  # NVML lists nothing; ROCm does
    assert amd.status == "fail" and 'CMAKE_ARGS="-DGGML_HIP=on -DGPU_TARGETS=gfx1151 ' in amd.fix
    no_toolkit = choose_build(machine(tools=("nvidia-smi",), outputs={SMI: csv4090}))
    c = backend_check(info, [gpu], no_toolkit)
    assert c.status == "fail" and "no CUDA toolkit (nvcc)" in c.fix
    assert c.fix.endswith('CMAKE_ARGS="$(python3 -m glmlocal.doctor --cmake-args)" pip install --force-reinstall '
                          '--no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==0.3.36"')
    assert backend_check(info, [], choose_build(machine())).status == "ok"  # a CPU machine, a CPU build


def test_child_needs_no_torch(tmp_path):
    # Doctor runs on a user install without the test extra: make importing torch fail in the child.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from glmlocal.doctor.checks import _child_main; sys.exit(_child_main(['smoke', sys.argv[1]]))")
    res = doctor.run_child([sys.executable, "-c", code, str(tmp_path)], timeout=300)
    assert res.returncode == 0 and res.result["ok"], res.output[-2000:]


@pytest.mark.slow
def test_cli_doctor(tmp_path):
    smoke = run_piped(["doctor", "--smoke-only"], timeout=600)
    assert smoke.returncode == 0 and "smoke test" in smoke.stdout
    full = run_piped(["doctor", "--json"], tmp_path, timeout=600)
    checks = {c["name"]: c for c in json.loads(full.stdout)}
    assert set(checks) == {"llama.cpp build", "GPUs", "RAM", "disk", "smoke test"}
    assert checks["smoke test"]["status"] == "ok" and checks["llama.cpp build"]["status"] == "ok"
    assert str(tmp_path) in checks["disk"]["detail"]
    assert full.returncode == 0


def test_cmake_args_need_only_the_standard_library():
    # .ci/run can ask for this machine's flags before anything is installed: -S hides site-packages. stdout is
    # only the flags (CMAKE_ARGS="$(...)" captures it); the backend and why go to stderr, one line.
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-S", "-m", "glmlocal.doctor", "--cmake-args"], cwd=repo, check=False,
                         capture_output=True, text=True, timeout=60)
    choice = choose_build()
    assert out.returncode == 0 and out.stdout.strip() == choice.args and len(out.stdout.splitlines()) == 1
    assert out.stderr.splitlines() == [f"glmlocal: {choice.reason}"]
    # This machine: an x86 CPU, the CUDA toolkit (nvcc) but no NVIDIA GPU: a CPU build, and it says why.
    if choice.backend == "cpu":
        assert "-DGGML_NATIVE=OFF" in choice.args and "-DGGML_RPC=ON" in choice.args
        assert choice.args == cpu_cmake_args()


# ---------------------------------------------------------------------------------------------
# The backend for each machine, from outputs recorded on real ones (tests/data/machines; first line = source)
# ---------------------------------------------------------------------------------------------
X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c bmi2 avx512f avx512_vnni avx512_bf16 avx512vbmi\n"
# The Exynos 2500 block of hrw/arm-socs-table#167 (Cortex-X925/A725 family, the cores DGX Spark's GB10 has).
EXYNOS = next(line for line in recorded("proc-cpuinfo-aarch64.txt").splitlines() if line.startswith("Features :"))


def machine(*, system="Linux", arch="x86_64", cpuinfo=X86, tools=(), outputs=None, files=(), env=None) -> Probe:
    """A Probe for a machine that has `tools` on PATH, answers commands with `outputs` (program name + args ->
    stdout, None = failure) and has `files` (glob patterns match exactly)."""
    outputs = outputs or {}

    def run(argv):
        key = " ".join([argv[0].rsplit("/", 1)[-1], *argv[1:]])
        return outputs.get(key)

    return Probe(run=run, which=lambda name: f"/usr/bin/{name}" if name in tools else None,
                 read=lambda path: cpuinfo if path == "/proc/cpuinfo" else None,
                 paths=lambda pattern: [f for f in files if f == pattern or (pattern.endswith("*/bin/nvcc")
                                                                             and f.startswith(pattern[:-10]))],
                 system=system, machine=arch, env=env or {})


SMI = "nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader"


def test_cuda_build_for_the_gpus_compute_capability():
    # nvidia-smi CSV recorded with a header and a memory column (doc example, matches RLinf/RLinf#255's 4090):
    # the parser takes the N.N field, whatever else the line has.
    csv4090 = block_after("nvidia-smi-query-csv-rtx4090.txt", "$ nvidia-smi")
    c = choose_build(machine(tools=("nvcc", "nvidia-smi"), outputs={SMI: csv4090}))
    assert c.backend == "cuda" and c.args.startswith("-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89 -DGGML_NATIVE=OFF")
    assert "-DGGML_AVX512_VNNI=ON" in c.args and "-DGGML_AVX_VNNI=OFF" in c.args and c.args.endswith("-DGGML_RPC=ON")
    assert "NVIDIA GeForce RTX 4090 (8.9)" in c.reason and "/usr/bin/nvcc" in c.reason
    # A 3090 and a 4090 in one box (club-3090#390's 3090 CSV line): both architectures, numeric order.
    both = csv4090 + block_after("nvidia-smi-query-csv-rtx3090.txt", "$ nvidia-smi").splitlines()[1] + "\n"
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;89 " in choose_build(machine(tools=("nvcc", "nvidia-smi"),
                                                                       outputs={SMI: both})).args


def test_dgx_spark_cuda_off_path_and_arm_cpu_flags():
    """GB10 reports compute capability 12.1 (lab notes, index id 56608019572) and [N/A] memory (unsloth#10703);
    its nvcc lives in /usr/local/cuda-13.0/bin, off a non-login shell's PATH; its CPU is Arm (no x86 flags)."""
    na = block_after("nvidia-smi-dgx-spark-gb10.txt", "--query-gpu=index,name,memory.total")
    assert parse_compute_caps(na) == []  # "0, NVIDIA GB10, [N/A], [N/A]": no capability there, not a crash
    gb10 = block_after("nvidia-smi-dgx-spark-gb10.txt", "--query-gpu=name,driver_version,compute_cap")
    assert parse_compute_caps(gb10) == [("NVIDIA GB10", "12.1")]  # the driver version 580.159.03 is not N.N
    spark = machine(arch="aarch64", cpuinfo=EXYNOS, tools=("nvidia-smi",), outputs={SMI: gb10},
                    files=("/usr/local/cuda-13.0/bin/nvcc",))
    c = choose_build(spark)
    assert c.backend == "cuda"
    assert c.args == ("-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=121 -DCMAKE_CUDA_COMPILER=/usr/local/cuda-13.0/bin/nvcc "
                      "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.6-a+dotprod+fp16+sve+i8mm+sve2 -DGGML_RPC=ON")
    assert "AVX" not in c.args


def test_arm_march_from_proc_cpuinfo_features():
    # Graviton3 (Neoverse V1; LKML thread, index id 12006810226): the mail client wrapped its Features line.
    lines = recorded("proc-cpuinfo-aarch64.txt").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Features"))
    end = next(i for i in range(start, len(lines)) if "CPU implementer" in lines[i])
    graviton3 = cpu_flags("Features\t: " + " ".join(lines[start:end]).split(":", 1)[1])
    assert {"sve", "i8mm", "asimddp"} <= graviton3 and "sve2" not in graviton3
    assert arm_march(graviton3) == "armv8.6-a+dotprod+fp16+sve+i8mm"
    assert arm_march(cpu_flags(EXYNOS)) == "armv8.6-a+dotprod+fp16+sve+i8mm+sve2"
    graviton2 = {"fp", "asimd", "asimdhp", "asimddp", "atomics"}  # Neoverse N1 (notes quoted in the same file)
    assert arm_march(graviton2) == "armv8.2-a+dotprod+fp16" and arm_march({"fp", "asimd"}) == "armv8-a"
    assert cpu_cmake_args(graviton2) == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_RPC=ON"


def test_hip_build_for_the_gfx_target_rocminfo_lists():
    strix = recorded("rocminfo-strix-halo-gfx1151.txt")  # antirez/ds4#475
    assert parse_rocminfo(strix) == [("gfx1151", "AMD Radeon 8060S Graphics")]
    assert parse_rocminfo(recorded("rocminfo-7900xtx-gfx1100.txt")) == [("gfx1100", "Radeon RX 7900 XTX")]
    mi = parse_rocminfo(recorded("rocminfo-mi300x-gfx942-mi250-gfx90a.txt"))
    assert [t for t, _ in mi] == ["gfx942", "gfx90a"]
    cpu_agent = "Agent 1\n  Name:   AMD Ryzen AI MAX+ 395\n  Device Type:   CPU\n"
    box = machine(tools=("hipconfig", "rocminfo"), outputs={"rocminfo": cpu_agent + strix})
    c = choose_build(box)
    assert c.backend == "hip" and c.args.startswith("-DGGML_HIP=on -DGPU_TARGETS=gfx1151 -DGGML_NATIVE=OFF")
    assert "AMD Radeon 8060S Graphics (gfx1151)" in c.reason
    two = machine(tools=("hipcc",), outputs={"rocminfo": recorded("rocminfo-mi300x-gfx942-mi250-gfx90a.txt")},
                  files=("/opt/rocm/bin/rocminfo",))
    assert "-DGPU_TARGETS=gfx942;gfx90a " in choose_build(two).args


def test_metal_on_apple_silicon_without_x86_flags():
    mac = choose_build(machine(system="Darwin", arch="arm64", cpuinfo=""))
    assert mac.backend == "metal" and mac.args == "-DGGML_METAL=on -DGGML_RPC=ON" and "Apple Silicon" in mac.reason
    rosetta = choose_build(machine(system="Darwin", arch="x86_64", cpuinfo="",
                                   outputs={"sysctl -n hw.optional.arm64": "1\n"}))
    assert rosetta.backend == "metal" and "Rosetta" in rosetta.reason and "AVX" not in rosetta.args
    intel_mac = choose_build(machine(system="Darwin", arch="x86_64", cpuinfo="", outputs={}))
    assert intel_mac.backend == "cpu" and intel_mac.args == "-DGGML_NATIVE=OFF -DGGML_RPC=ON"


def test_vulkan_when_only_a_vulkan_sdk_is_present():
    c = choose_build(machine(tools=("glslc",)))
    assert c.backend == "vulkan" and c.args.startswith("-DGGML_VULKAN=on -DGGML_NATIVE=OFF -DGGML_AVX=ON")
    # ROCm with a GPU wins over Vulkan (as the issue orders them); a CUDA GPU wins over both.
    strix = recorded("rocminfo-strix-halo-gfx1151.txt")
    assert choose_build(machine(tools=("glslc", "hipconfig", "rocminfo"), outputs={"rocminfo": strix})).backend == "hip"
    csv = block_after("nvidia-smi-query-csv-rtx4090.txt", "$ nvidia-smi")
    assert choose_build(machine(tools=("glslc", "nvcc", "nvidia-smi"), outputs={SMI: csv})).backend == "cuda"


def test_cpu_build_says_what_is_missing():
    csv = block_after("nvidia-smi-query-csv-rtx4090.txt", "$ nvidia-smi")
    no_toolkit = choose_build(machine(tools=("nvidia-smi",), outputs={SMI: csv}))
    assert no_toolkit.backend == "cpu" and "RTX 4090" in no_toolkit.reason and "nvcc" in no_toolkit.reason
    no_gpu = choose_build(machine(tools=("nvcc",)))  # this machine's case: the toolkit, no GPU
    assert no_gpu.backend == "cpu" and "lists no GPU" in no_gpu.reason
    nothing = choose_build(machine())
    assert nothing.backend == "cpu" and nothing.args == cpu_cmake_args(cpu_flags(X86)) and "no GPU toolkit" in nothing.reason
    # An old driver without the compute_cap field: `nvidia-smi -L` still lists the GPU; llama.cpp's default archs.
    old = machine(tools=("nvcc", "nvidia-smi"), outputs={"nvidia-smi -L": "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-1)\n"})
    c = choose_build(old)
    assert c.backend == "cuda" and "CMAKE_CUDA_ARCHITECTURES" not in c.args and "default architectures" in c.reason


def test_ram_is_judged_with_vram():
    gib = 1 << 30
    assert doctor.ram_check(24 * gib, 20 * gib).status == "warn"
    assert doctor.ram_check(64 * gib, 60 * gib, vram=24 * gib).status == "ok"
    assert doctor.ram_check(128 * gib, 100 * gib).status == "ok"


def test_gpus_come_from_llama_cpps_device_list_read_in_the_child():
    """The doctor's GPU check lists what llama.cpp will offload to (its device registry, as the child read it),
    not only what NVML sees: a Metal or Vulkan GPU counts too, and a unified one says it shares RAM."""
    gib = 1 << 30
    devices = [{"name": "CPU", "description": "cpu", "type": "CPU", "free_bytes": 60 * gib, "total_bytes": 64 * gib,
                "buffer_type": "CPU", "backend": "CPU"},
               {"name": "Vulkan0", "description": "AMD Radeon RX 7900 XTX (RADV NAVI31)", "type": "GPU",
                "free_bytes": 22 * gib, "total_bytes": 24 * gib, "buffer_type": "Vulkan0", "backend": "Vulkan"}]
    info = ChildResult({"backends": ["Vulkan", "CPU"], "system_info": "", "devices": devices}, 0, None, False, "")
    gpus, notes = doctor._gpus(info, 64 * gib)
    assert [g.device_name for g in gpus] == ["Vulkan0"] and gpus[0].bandwidth == 960e9  # RX 7900 XTX
    c = doctor.gpu_check(gpus, notes)
    assert c.status == "ok" and c.detail.startswith("Vulkan0 AMD Radeon RX 7900 XTX (RADV NAVI31): 22.0 GiB of 24.0 GiB free")
    assert backend_check(info, gpus, choose_build(machine(tools=("glslc",)))).status == "ok"
    failed, _ = doctor._gpus(ChildResult(None, 1, None, False, "boom"), 64 * gib)  # the child failed: NVML's list
    assert [g.name for g in failed] == [g.name for g in probe_gpus()[0]]
