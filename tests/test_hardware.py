"""Hardware probe: size parsing, overrides, CUDA_VISIBLE_DEVICES, the NVML path, llama.cpp's device registry,
unified memory and the OS limit on the GPU's share.

This machine has no GPU, so the NVML path is exercised with a fake `pynvml` module injected into
probe_gpus(): a unit test of our parsing/ordering logic against NVML's documented API, not of NVML.
The RAM/cores/bandwidth path runs for real (psutil, numpy), and so does llama.cpp's backend registry (the CPU
here; RPC devices in a child process). Devices of other machines (Metal, Vulkan, ROCm, CUDA on GB10) are the
`--list-devices` lines llama.cpp printed there (tests/data/machines; each file's first line is its source).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from glmlocal.errors import InputError
from glmlocal.llama import rpc
from glmlocal.llama.ggml import Device
from glmlocal.plan.devices import local_gpus
from glmlocal.plan.hardware import (
    DEFAULT_CPU_BW,
    GIB,
    gpu_bandwidth,
    measure_cpu_bandwidth,
    parse_size,
    parse_sizes,
    probe,
    probe_gpus,
    visible_selection,
)
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.unified import (
    RAISE_METAL,
    RAISE_TTM,
    UnifiedMemory,
    gtt_limit,
    metal_memory,
    parse_kernel_params,
    parse_sysctl,
    parse_working_set,
)
from tests.recorded import list_devices, recorded

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
needs_rpc = pytest.mark.skipif(not rpc.rpc_available(), reason="llama-cpp-python built without -DGGML_RPC=ON")


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * GIB), ("24gib", 24 * GIB), ("24GB", 24 * 10**9), ("24 GB", 24 * 10**9), ("24", 24 * GIB),
    ("512MiB", 512 * 2**20), ("512MB", 512 * 10**6), ("1.5TiB", int(1.5 * 2**40)), ("24G", 24 * GIB),
])
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "24 parsecs", "-3GiB", "0"])
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(InputError):
        parse_size(bad)


def test_parse_sizes_one_per_gpu():
    assert parse_sizes("24GiB,48GiB") == [24 * GIB, 48 * GIB]
    with pytest.raises(InputError):
        parse_sizes(",")


def test_overrides_describe_a_machine_we_do_not_have():
    hw = probe(PlanOptions(gpu_mem="24GiB,24GiB", ram="128GiB", threads=16, gpu_bw=1000, cpu_bw=200))
    assert [g.total for g in hw.gpus] == [24 * GIB, 24 * GIB] and [g.free for g in hw.gpus] == [24 * GIB] * 2
    assert [g.index for g in hw.gpus] == [0, 1] and all(g.bandwidth == 1e12 for g in hw.gpus)
    assert hw.ram_total == hw.ram_available == 128 * GIB and hw.cores == 16 and hw.cpu_bandwidth == 200e9
    hw = probe(PlanOptions(gpu_mem="24GiB", ram="64GiB"))
    assert hw.cpu_bandwidth == DEFAULT_CPU_BW and any("assumed" in n for n in hw.notes)
    assert any(n.startswith(f"threads {hw.cores} (this machine's") and "--threads" in n for n in hw.notes)
    assert not any(n.startswith("threads") for n in probe(PlanOptions(ram="64GiB", threads=8)).notes)


def test_cpu_only_and_real_ram_probe():
    import psutil

    hw = probe(PlanOptions(cpu_only=True, gpu_mem="24GiB"), cpu_bw_probe=lambda threads: 50e9)
    assert hw.cpu_only and hw.gpus == ()
    assert hw.ram_total == psutil.virtual_memory().total
    assert 0 < hw.ram_available <= hw.ram_total
    assert hw.cores == (psutil.cpu_count(logical=False) or psutil.cpu_count())
    assert hw.cpu_bandwidth == 50e9


def test_cpu_bandwidth_measurement_is_plausible():
    bw = measure_cpu_bandwidth(2, total_bytes=64 * 2**20, repeats=2)
    assert 1e9 < bw < 2e12  # any machine from a laptop to a 12-channel server


def test_cpu_bandwidth_is_measured_once_and_remembered(tmp_path, monkeypatch):
    import glmlocal.plan.hardware as hardware

    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "measure_cpu_bandwidth", lambda cores: calls.append(cores) or 42e9)
    assert hardware.cached_cpu_bandwidth(2) == 42e9
    assert hardware.cached_cpu_bandwidth(2) == 42e9  # second start reads the file
    assert calls == [2]
    assert hardware.cached_cpu_bandwidth(3) == 42e9  # another thread count is measured anew
    assert calls == [2, 3]
    (tmp_path / "hardware-cache.json").write_text("not json")
    assert hardware.cached_cpu_bandwidth(2) == 42e9 and calls == [2, 3, 2]  # corrupt cache: re-measure


def test_gpu_bandwidth_table_and_nvml_formula():
    assert gpu_bandwidth("NVIDIA GeForce RTX 4090") == 1008e9
    assert gpu_bandwidth("NVIDIA GeForce RTX 3090 Ti") == 1008e9  # longest name wins over "RTX 3090"
    assert gpu_bandwidth("NVIDIA H100 80GB HBM3") == 3350e9
    # Unknown name: clock x bus width x 2 (DDR). A100 40GB numbers give its datasheet 1555 GB/s.
    assert gpu_bandwidth("Mystery GPU", 1215, 5120) == pytest.approx(1555.2e9)


UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]


@pytest.mark.parametrize("env,expected", [
    (None, None), ("", []), ("-1", []), ("1", [1]), ("2,0", [2, 0]), ("0,7,1", [0]),
    ("GPU-bbbb2222", [1]), ("bbbb2222-0000,GPU-aaaa", [1, 0]), ("GPU-zzzz", []), ("1,1", [1]),
])
def test_cuda_visible_devices(env, expected):
    assert visible_selection(env, UUIDS) == expected


class FakeNVML:
    """Minimal stand-in for pynvml: three GPUs with known names, memory, clocks."""

    NVML_CLOCK_MEM = 2

    def __init__(self, fail_init=False):
        self.fail_init, self.shutdown = fail_init, False
        self.devs = [
            ("NVIDIA GeForce RTX 3090", 24 * GIB, 23 * GIB, 9751, 384),
            (b"NVIDIA GeForce RTX 4090", 24 * GIB, 20 * GIB, 10501, 384),
            ("Some Future GPU", 48 * GIB, 47 * GIB, 1000, 4096),
        ]

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return len(self.devs)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return UUIDS[h].encode()

    def nvmlDeviceGetName(self, h):
        return self.devs[h][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.devs[h][1], free=self.devs[h][2], used=self.devs[h][1] - self.devs[h][2])

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_MEM
        return self.devs[h][3]

    def nvmlDeviceGetMemoryBusWidth(self, h):
        return self.devs[h][4]


def test_nvml_probe_reads_every_visible_gpu():
    nvml = FakeNVML()
    gpus, notes = probe_gpus(nvml, env={})
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090", "Some Future GPU"]
    assert [g.free for g in gpus] == [23 * GIB, 20 * GIB, 47 * GIB]
    assert [g.bandwidth for g in gpus] == [936e9, 1008e9, pytest.approx(1024e9)]
    assert nvml.shutdown and notes == []


def test_nvml_probe_honours_cuda_visible_devices():
    gpus, notes = probe_gpus(FakeNVML(), env={"CUDA_VISIBLE_DEVICES": "GPU-cccc3333,0"})
    assert [(g.index, g.name) for g in gpus] == [(0, "Some Future GPU"), (1, "NVIDIA GeForce RTX 3090")]
    assert gpus[0].uuid == UUIDS[2] and "2 GPU(s) visible" in notes[0]
    assert probe_gpus(FakeNVML(), env={"CUDA_VISIBLE_DEVICES": ""})[0] == []


def test_no_driver_means_cpu_only_with_a_note():
    gpus, notes = probe_gpus(FakeNVML(fail_init=True), env={})
    assert gpus == [] and "no NVIDIA driver" in notes[0]


def test_probe_with_injected_nvml_and_gpu_bandwidth_override():
    hw = probe(PlanOptions(ram="64GiB", gpu_bw=500), nvml=FakeNVML())
    assert len(hw.gpus) == 3 and all(g.bandwidth == 500e9 for g in hw.gpus)


def test_real_nvml_on_this_machine_does_not_crash():
    """The real pynvml: on a machine without an NVIDIA driver this must yield no GPUs, not an error."""
    gpus, notes = probe_gpus(env={})
    assert isinstance(gpus, list)
    if not gpus:
        assert notes


# ---------------------------------------------------------------------------------------------
# llama.cpp's backend registry (real on this machine: CPU, and RPC devices in a child process)
# ---------------------------------------------------------------------------------------------
GB10_MEMINFO = "\n".join(line for line in recorded("nvidia-smi-dgx-spark-gb10.txt").splitlines()
                         if line.strip().startswith(("MemTotal:", "MemAvailable:")))  # nvitop#208, a real GB10


class FakeNoNvml:
    """nvidia-ml-py on a machine without an NVIDIA driver."""

    @staticmethod
    def nvmlInit():
        raise OSError("no driver")


def test_registry_devices_of_this_build_are_probed_for_real():
    """The CPU-only build here: the registry has the CPU (backend "CPU", with its memory) and no GPU to offload
    to, so the probe finds no GPUs and no unified pool."""
    from glmlocal.llama import ggml

    devs = ggml.devices()
    cpu = next(d for d in devs if d.type == "CPU")
    assert cpu.backend == "CPU" and cpu.total_bytes > 0 and 0 < cpu.free_bytes <= cpu.total_bytes
    gpus, pool, notes = local_gpus(64 * GIB, nvml=FakeNoNvml, env={})
    assert gpus == [] and pool is None and any("no NVIDIA driver" in n for n in notes)


RPC_CHILD = """
import json, sys
from glmlocal.llama import ggml, rpc
from glmlocal.plan.devices import local_gpus
from glmlocal.plan.hardware import probe
from glmlocal.plan.options import PlanOptions
with rpc.RpcServer(threads=1) as server:
    hw = probe(PlanOptions(rpc=(server.endpoint,), ram="16GiB", threads=2, cpu_bw=20), nvml=False)
    devs = [d.__dict__ for d in ggml.devices()]
    local = local_gpus(16 << 30, nvml=False, env={})[0]
    print(json.dumps({"devices": devs, "gpus": [[g.device_name, g.total, g.free, g.unified] for g in hw.gpus],
                      "local": [g.device_name for g in local]}))
"""


@needs_rpc
def test_rpc_devices_come_from_the_registry_once():
    """A registered RPC server is a GPU-type device of backend "RPC" in llama.cpp's registry, with the memory the
    server reports; the probe plans it once (as an RPC GPU, not again as a local one). In a child process:
    registering is process-global."""
    code = RPC_CHILD.replace("nvml=False", "nvml=type('N', (), {'nvmlInit': staticmethod(lambda: 1/0)})")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rpc_dev = [d for d in res["devices"] if d["backend"] == "RPC"]
    assert len(rpc_dev) == 1 and rpc_dev[0]["type"] == "GPU" and rpc_dev[0]["name"] == "RPC0"
    assert rpc_dev[0]["total_bytes"] > 0
    assert res["gpus"] == [["RPC0", rpc_dev[0]["total_bytes"], rpc_dev[0]["free_bytes"], False]]
    assert res["local"] == []


# ---------------------------------------------------------------------------------------------
# Devices as llama.cpp reports them on other machines (recorded `--list-devices` lines: common/arg.cpp prints
# each registry device's name, description and ggml_backend_dev_memory), with NVML, sysctl and /proc inputs
# ---------------------------------------------------------------------------------------------
def registry(file: str, name: str, dev_type: str, backend: str, desc: str = "") -> Device:
    """The recorded device `name` (whose description contains `desc`) as ggml.devices() would return it (type
    and backend as the bundled llama.cpp sets them)."""
    n, desc, total, free = next(d for d in list_devices(file) if d[0] == name and d[2] > 0 and desc in d[1])
    return Device(n, desc, dev_type, free, total, f"{backend}0", backend)


BLAS = Device("BLAS", "Accelerate", "ACCEL", 0, 0, "", "BLAS")  # listed next to MTL0 on macOS


def test_metal_device_is_unified_with_the_working_set_as_its_limit():
    """M4 Max 128 GB on macOS 26: `MTL0: Apple M4 Max (110100 MiB, ...)` (= recommendedMaxWorkingSetSize
    115448.73 MB in the same log, index id 68997509094); sysctl says hw.memsize 137438953472 and
    iogpu.wired_limit_mb 0 (sysctl-mac-128gb.txt). ggml calls Metal a GPU (not IGPU): unified by its backend."""
    mtl = registry("llama-metal-init-logs.txt", "MTL0", "GPU", "Metal", "M4 Max")
    assert mtl.description == "Apple M4 Max" and mtl.total_bytes == 110100 * MIB
    sysctl = "hw.memsize: 137438953472\niogpu.wired_limit_mb: 0\n"
    gpus, pool, notes = local_gpus(128 * GIB, nvml=FakeNoNvml, env={}, devices=[BLAS, mtl],
                                   run=lambda argv: sysctl if argv[0] == "sysctl" else None)
    assert [(g.device_name, g.name, g.total, g.unified) for g in gpus] == [("MTL0", "Apple M4 Max", 110100 * MIB, True)]
    assert gpus[0].bandwidth == 546e9  # Apple's M4 Max spec (MacRumors)
    # Raising: leave macOS max(8 GiB, RAM/8) = 16 GiB of 128 -> 112 GiB, the 114688 MiB ds4#893 verified.
    assert pool == UnifiedMemory(128 * GIB, 110100 * MIB, "Metal recommendedMaxWorkingSetSize", 112 * GIB, RAISE_METAL)
    assert pool.raise_command(112 * GIB) == "sudo sysctl iogpu.wired_limit_mb=114688 (until reboot)"
    assert not any("iogpu" in n for n in notes)
    raised = local_gpus(128 * GIB, nvml=FakeNoNvml, env={}, devices=[mtl],
                        run=lambda argv: "hw.memsize: 137438953472\niogpu.wired_limit_mb: 114688\n")
    assert any("iogpu.wired_limit_mb=114688 is set" in n for n in raised[2])


@pytest.mark.parametrize("line,gib", [
    ("ggml_metal_device_init: recommendedMaxWorkingSetSize  = 115448.73 MB", 107.52),  # M4/M5 Max 128 GB, macOS 26
    ("ggml_metal_init: recommendedMaxWorkingSetSize  = 103079.22 MB", 96.0),  # M3/M4 Max 128 GB, macOS 14/15
    ("ggml_metal_device_init: recommendedMaxWorkingSetSize  = 498216.21 MB", 464.0),  # M3 Ultra 512 GB
    ("ggml_metal_init: recommendedMaxWorkingSetSize  = 51539.61 MB", 48.0),  # M1/M2 Max 64 GB
    ("recommendedMaxWorkingSetSize: 112.00 GiB     # with iogpu.wired_limit_mb = 114688", 112.0),  # ds4#893
])
def test_metal_working_set_lines(line, gib):
    assert any(line in text_line for text_line in recorded_lines())  # the line is in the recorded logs
    assert parse_working_set(line) / GIB == pytest.approx(gib, abs=0.005)


def recorded_lines() -> list[str]:
    return recorded("llama-metal-init-logs.txt").splitlines() + recorded("sysctl-mac-128gb.txt").splitlines()


def test_macos_limit_without_llama_cpp_falls_back_to_sysctl():
    """M2 Pro Mac mini 32 GB (validation log, index id 66485229638): hw.memsize 34359738368, wired limit 0 (the
    default), "recommended GPU set 25.0 GiB". With the working set: 25 GiB, and no room to raise (32 - 8 = 24 GiB
    is below it). Without it: iogpu.wired_limit_mb when set, else 3/4 of RAM."""
    sysctl = parse_sysctl(recorded("sysctl-mac-m2pro-32gb.txt"))
    assert sysctl["hw.memsize"] == "34359738368" and sysctl["iogpu.wired_limit_mb"] == "0"
    pool = int(sysctl["hw.memsize"])
    assert metal_memory(pool, 25 * GIB).limit_max == 25 * GIB
    assert metal_memory(pool).gpu_limit == 24 * GIB and "assumed 3/4" in metal_memory(pool).limit_source
    assert parse_sysctl("iogpu.wired_limit_mb: 0 -> 114688")["iogpu.wired_limit_mb"] == "0"  # `sysctl -w` echo
    assert metal_memory(128 * GIB, wired_limit_mb=114688).gpu_limit == 112 * GIB


def test_strix_halo_vulkan_reports_the_gtt_pool():
    """Vulkan on Strix Halo: `Vulkan0: Radeon 8060S Graphics (RADV GFX1151) (91136 MiB, 90974 MiB free)` (Rocky
    Linux guide, index id 62450386783): ggml-vulkan sums every heap of an integrated GPU (type IGPU). The kernel
    command line of kyuz0's toolboxes README caps GTT at ttm.pages_limit=32505856 x 4 KiB = 124 GiB."""
    vk = registry("llama-devices-vulkan.txt", "Vulkan0", "IGPU", "Vulkan")
    cmdline = next(line for line in recorded("strix-halo-memory-config.txt").splitlines()
                   if line.startswith("amd_iommu=off amdgpu.gttsize=126976"))
    gpus, pool, _ = local_gpus(128 * GIB, nvml=FakeNoNvml, env={}, devices=[vk],
                               read=lambda path: cmdline if path == "/proc/cmdline" else None)
    assert gpus[0].unified and gpus[0].total == 91136 * MIB and gpus[0].bandwidth == 256e9
    assert pool.gpu_limit == 91136 * MIB and pool.limit_max == 124 * GIB and pool.raise_how == RAISE_TTM
    assert "ttm.pages_limit=32505856" in pool.limit_source and "124.0 GiB" in pool.limit_source
    # 124 GiB = 126976 MiB = 32505856 pages: the command the README's users type.
    assert pool.raise_command(124 * GIB) == ("kernel parameters ttm.pages_limit=32505856 "
                                             "ttm.page_pool_size=32505856 (then reboot)")


def test_gtt_limit_sources():
    # lhl/strix-halo-testing's /etc/modprobe.d lines ("options ttm pages_limit=N" = kernel parameter ttm.pages_limit)
    lhl = "\n".join(ln for ln in recorded("strix-halo-memory-config.txt").splitlines() if ln.startswith("options "))
    params = parse_kernel_params(lhl)
    assert params["amdgpu.gttsize"] == "120000" and params["ttm.pages_limit"] == "31457280"
    assert gtt_limit(128 * GIB, params) == (120 * GIB, "GTT (ttm.pages_limit=31457280)")  # 31457280 x 4 KiB
    assert gtt_limit(128 * GIB, {"amdgpu.gttsize": "126976"})[0] == 124 * GIB
    assert gtt_limit(128 * GIB) == (64 * GIB, "GTT kernel default (half of RAM)")  # max(3 GiB, RAM/2)
    assert gtt_limit(4 * GIB)[0] == 3 * GIB
    assert gtt_limit(128 * GIB, params, gtt_total=100 * GIB)[0] == 100 * GIB  # sysfs wins


def test_strix_halo_rocm_sees_only_the_carve_out():
    """ROCm on Strix Halo reports the BIOS carve-out (`ROCm0: Radeon 8060S Graphics (110456 MiB, ...)`, Windows
    build guide, index id 55726834592); the APU is recognised by name even if HIP calls it a GPU."""
    rocm = registry("llama-devices-hip.txt", "ROCm0", "GPU", "ROCm")
    gpus, pool, notes = local_gpus(128 * GIB, nvml=FakeNoNvml, env={}, devices=[rocm], read=lambda p: None)
    assert gpus[0].unified and pool.gpu_limit == 110456 * MIB and pool.raise_how == ""
    assert any("BIOS carve-out" in n and "Vulkan" in n for n in notes)


def test_dgx_spark_gb10_through_the_registry():
    """`CUDA0: NVIDIA GB10 (124609 MiB, 121444 MiB free)` (DGX Spark lab notes, index id 56608019572): ggml-cuda
    marks prop.integrated devices IGPU and reports MemAvailable as free; no OS limit below the pool."""
    gb10 = registry("llama-devices-cuda.txt", "CUDA0", "IGPU", "CUDA")
    gpus, pool, _ = local_gpus(int(121.69 * GIB), nvml=FakeNoNvml, env={}, devices=[gb10])
    assert gpus[0].unified and gpus[0].bandwidth == 273e9 and gpus[0].free == 121444 * MIB
    assert pool.gpu_limit == 124609 * MIB and pool.limit_max == 0 and pool.raise_how == ""


class GB10NVML(FakeNVML):
    """NVML on a DGX Spark: the GPU is there, its memory query is NVML_ERROR_NOT_SUPPORTED (nvitop#208)."""

    def __init__(self):
        super().__init__()
        self.devs = [("NVIDIA GB10", 0, 0, None, None)]

    def nvmlDeviceGetMemoryInfo(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")


def test_gb10_nvml_without_memory_is_a_unified_gpu_not_a_crash():
    """unsloth#10703 read GB10's [N/A] memory as "no GPU"; here NVML's NOT_SUPPORTED makes it a unified GPU
    sized from /proc/meminfo (MemTotal 127600748 kB, MemAvailable 118566368 kB, recorded on a GB10)."""
    gpus, notes = probe_gpus(GB10NVML(), env={}, read=lambda path: GB10_MEMINFO)
    assert [(g.name, g.total, g.free, g.unified) for g in gpus] == [
        ("NVIDIA GB10", 127600748 * 1024, 118566368 * 1024, True)]
    assert gpus[0].bandwidth == 273e9  # by name (the clock query is not supported either)
    # A CPU-only llama.cpp build on the Spark: NVML's GPU stands in, unified, with a note to rebuild.
    cpu_dev = Device("CPU", "Cortex-X925", "CPU", 1, 1, "CPU", "CPU")
    gpus, pool, notes = local_gpus(127600748 * 1024, nvml=GB10NVML(), env={}, devices=[cpu_dev],
                                   read=lambda path: GB10_MEMINFO)
    assert gpus[0].unified and pool.gpu_limit == 127600748 * 1024 and any("no GPU backend" in n for n in notes)


def test_cuda_registry_devices_take_nvml_bandwidth_and_uuid():
    """Two RTX 3090s as llama.cpp loads them (`using device CUDA0 (NVIDIA GeForce RTX 3090) - 24112 MiB free`,
    llama.cpp#14939; 24576 MiB total per nvidia-smi): memory from the registry, bandwidth and UUID from NVML
    (CUDA{i} = NVML's i-th visible GPU)."""
    lines = [ln for ln in recorded("llama-devices-cuda.txt").splitlines() if "RTX 3090) - " in ln]
    devs = [Device(f"CUDA{i}", "NVIDIA GeForce RTX 3090", "GPU", int(ln.split(" - ")[1].split()[0]) * MIB,
                   24576 * MIB, f"CUDA{i}", "CUDA") for i, ln in enumerate(lines)]
    nvml = FakeNVML()
    nvml.devs = [("NVIDIA GeForce RTX 3090", 24 * GIB, 23 * GIB, 9751, 384)] * 2
    gpus, pool, _ = local_gpus(128 * GIB, nvml=nvml, env={}, devices=devs)
    assert [(g.device_name, g.free, g.total, g.uuid, g.unified) for g in gpus] == [
        ("CUDA0", 24112 * MIB, 24576 * MIB, UUIDS[0], False), ("CUDA1", 24112 * MIB, 24576 * MIB, UUIDS[1], False)]
    assert all(g.bandwidth == 936e9 for g in gpus) and pool is None


def test_an_igpu_next_to_a_discrete_gpu_is_left_out():
    """HIP lists a 7900 XTX and the Ryzen's iGPU (gfx1036, index id 68291284354); llama.cpp offloads to the
    discrete one only (integrated GPUs only when there is no discrete GPU), and so does the plan."""
    xtx = Device("ROCm0", "AMD Radeon RX 7900 XTX", "GPU", 24560 * MIB, 24560 * MIB, "ROCm0", "ROCm")
    igpu = Device("ROCm1", "AMD Radeon Graphics", "IGPU", 15607 * MIB, 15607 * MIB, "ROCm1", "ROCm")
    gpus, pool, _ = local_gpus(64 * GIB, nvml=FakeNoNvml, env={}, devices=[xtx, igpu])
    assert [g.device_name for g in gpus] == ["ROCm0"] and gpus[0].bandwidth == 960e9 and pool is None


def test_probe_uses_the_registry_and_keeps_the_pool():
    mtl = registry("llama-devices-metal.txt", "MTL0", "GPU", "Metal")  # M1 Max, macOS 26: 25559 MiB
    hw = probe(PlanOptions(ram="32GiB", threads=8, cpu_bw=100), nvml=FakeNoNvml, devices=[BLAS, mtl])
    assert [g.device_name for g in hw.gpus] == ["MTL0"] and hw.gpus[0].unified and hw.gpus[0].bandwidth == 400e9
    assert hw.unified.pool == 32 * GIB and hw.unified.gpu_limit == 25559 * MIB
    assert probe(PlanOptions(ram="32GiB", threads=8, cpu_bw=100, gpu_mem="24GiB"), devices=[mtl]).unified is None
