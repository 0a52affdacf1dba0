"""The multi-device (GPU) path on a machine without a GPU: llama.cpp's RPC backend as the stand-in GPU.

ggml-rpc exposes a local RPC server's CPU backend as a device of type GPU ("RPC0", "RPC1"), and llama.cpp
offloads to it exactly as to CUDA0: -ngl, tensor_split, -ot overrides, per-device KV cache, scheduler
splits, per-device buffer sizes in its log. What it lacks is CUDA's op_offload, so ops on RAM-resident
experts run on the CPU backend; the planner models that (hardware.GPU.op_offload=False) by replaying
llama.cpp's scheduler. Each load runs in its own process (tests/rpc_child.py): registering an RPC server
is process-global. RPC computes on the CPU, so greedy tokens must equal the CPU-only engine's, exactly,
once both use the same kernels: on this CPU, Q4_K weights in RAM get repacked (CPU_REPACK) for kernels
that sum in another order than the plain ones the RPC server's buffers use, and on a random tiny model
that flips a near-tie after a few tokens. So the token comparisons load with repacking off
(use_extra_bufts=False) in both runs; the repack prediction is checked on its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from glmlocal.errors import EngineError, InputError
from glmlocal.llama import rpc
from glmlocal.plan.hardware import GIB, GPU, Hardware, probe
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.planner import footprint_from_gguf, plan

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
needs_rpc = pytest.mark.skipif(not rpc.rpc_available(),
                               reason="llama-cpp-python built without -DGGML_RPC=ON (see glmlocal doctor --cmake-args)")


def run_child(**req) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.rpc_child", json.dumps(req)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def close(predicted: float, measured: float, rel: float = 0.05) -> bool:
    return abs(predicted - measured) <= rel * measured + 0.006 * MIB  # the log prints MiB with 2 decimals


@pytest.fixture(scope="module")
def mid(gguf_factory):
    """4 layers (1 dense + 3 MoE with 13-16 MiB of experts each): room for whole, partial and CPU layers."""
    return str(gguf_factory("mid", "q4_k_m"))


@pytest.fixture(scope="module")
def cpu_run(mid):
    return run_child(gguf=mid, gpu_mib=[], ctx=1024, no_repack=True)


def _assert_matches_plan(res: dict) -> None:
    """Every device's model/KV/compute buffers within 5% of its DevicePlan; the -ot lines as planned."""
    real = res["by_device"]
    for dev in res["devices"]:
        got = real.get(dev["name"], {})
        compute = got.get("compute", 0) + got.get("output", 0)
        for part, measured in (("weights", got.get("model", 0)), ("kv", got.get("kv", 0)), ("compute", compute)):
            assert close(dev[part], measured), (dev["name"], part, dev[part] / MIB, measured / MIB)
    assert set(real) == {d["name"] for d in res["devices"]}, real  # nothing landed on an unplanned device
    assert "CPU_REPACK" not in res["buffers"]["model"]  # loaded with repacking off (see the module docstring)
    expected = {f"blk.{i}.ffn_{k}_exps.weight" for i in range(8) for k in ("up", "gate", "down")
                if any(re.search(p, f"blk.{i}.ffn_{k}_exps.weight") for p, _ in res["overrides"])}
    assert set(res["overridden"]) == expected


# ---------------------------------------------------------------------------------------------
# Loads on RPC devices
# ---------------------------------------------------------------------------------------------
@needs_rpc
@pytest.mark.parametrize("budget_mib", [30, 16])
def test_one_rpc_gpu_matches_the_plan(mid, cpu_run, budget_mib):
    """30 MiB: two MoE layers' experts in RAM and one layer's split (gate/up in RAM, down on the device);
    16 MiB: no room for experts at all and the first layer runs on the CPU (-ngl below the layer count)."""
    res = run_child(gguf=mid, gpu_mib=[budget_mib], ctx=1024, no_repack=True)
    assert res["engine_devices"] == ["RPC0"] and res["gpu_devices"] == ["RPC0"]
    rpc, cpu = res["devices"]
    if budget_mib == 30:
        assert len(res["overrides"]) == 2 and rpc["expert_layers"] and set(cpu["expert_layers"]) == {1, 2, 3}
        assert set(rpc["expert_layers"]) & set(cpu["expert_layers"])  # a layer split between the two
    else:
        assert cpu["layers"] == [0] and rpc["expert_layers"] == [] and res["n_gpu_layers"] < 6
    _assert_matches_plan(res)
    assert res["tokens"] == cpu_run["tokens"]


@needs_rpc
def test_two_rpc_gpus_share_layers_and_experts(mid, cpu_run):
    """Two 26 MiB devices: the layers split 2/2 (tensor_split), each device holds part of its own
    layers' experts, the rest stays in RAM; per-device buffers as planned; same tokens as the CPU."""
    res = run_child(gguf=mid, gpu_mib=[26, 26], ctx=1024, no_repack=True)
    assert res["engine_devices"] == ["RPC0", "RPC1"]
    rpc0, rpc1, _cpu = res["devices"]
    assert rpc0["layers"] and rpc1["layers"] and rpc0["expert_layers"] and rpc1["expert_layers"]
    assert "-ts 2,4" in res["flags"]
    _assert_matches_plan(res)
    assert res["tokens"] == cpu_run["tokens"]


@pytest.mark.parametrize("use_mmap", [False, True])
def test_cpu_plan_counts_the_repacked_weights(mid, use_mmap):
    """Q4_K matmul weights in RAM go to CPU_REPACK: DevicePlan.repack predicts that buffer. Without mmap it
    and the plain CPU buffer add up to the planned weights; with mmap the whole file stays mapped and the
    repacked copy comes on top (the mapped pages it was read from are not touched again)."""
    res = run_child(gguf=mid, gpu_mib=[], ctx=1024, use_mmap=use_mmap)
    (cpu,) = res["devices"]
    model = res["buffers"]["model"]
    assert cpu["repack"] > 0 and close(cpu["repack"], model["CPU_REPACK"])
    if use_mmap:
        assert close(cpu["weights"], model["CPU_Mapped"])
    else:
        assert close(cpu["weights"], model["CPU"] + model["CPU_REPACK"])


@needs_rpc
def test_refuses_before_loading_when_the_rpc_device_is_too_small(mid):
    res = run_child(gguf=mid, gpu_mib=[30], ctx=1024, capacity_mib=8)
    assert res["error"] == "PlanError" and "RPC0" in res["message"]
    assert "tokens" not in res  # nothing was loaded


# ---------------------------------------------------------------------------------------------
# In-process parts (no model load, no registration)
# ---------------------------------------------------------------------------------------------
@needs_rpc
def test_an_unreachable_rpc_server_is_a_clear_error():
    with rpc.RpcServer() as srv:
        port = srv.port
    with pytest.raises(EngineError, match="no RPC server answers"):  # ggml-rpc itself would abort()
        rpc.add_rpc_server(f"127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(InputError):
        rpc.add_rpc_server("no-port-here")


def test_gpus_without_op_offload_keep_expert_work_on_the_cpu(gguf_factory):
    """CUDA (op_offload): the first GPU reserves a slot for copying RAM weights in, the CPU computes
    little. RPC (none): no slot on the device; the CPU's compute buffer holds the RAM experts' work."""
    fp = footprint_from_gguf(gguf_factory("mid", "q4_k_m"))
    machine = lambda off: Hardware((GPU(0, "g", 40 * MIB, 40 * MIB, 50e9, device="RPC0" if not off else "",
                                        op_offload=off),), 16 * GIB, 16 * GIB, 2, 20e9)
    cuda, rpc = plan(fp, machine(True), ctx=1024, margin=0), plan(fp, machine(False), ctx=1024, margin=0)
    assert [d.name for d in cuda.devices] == ["CUDA0", "CPU"] and [d.name for d in rpc.devices] == ["RPC0", "CPU"]
    assert cuda.devices[1].layers == rpc.devices[1].layers == ()  # every layer's attention on the device
    assert rpc.devices[1].compute > 4 * cuda.devices[1].compute
    assert cuda.devices[0].compute > rpc.devices[0].compute  # the copy slot
    no_off = plan(fp, machine(True), ctx=1024, margin=0, op_offload=False)
    assert not no_off.op_offload and "--no-op-offload" in no_off.llama_cpp_flags()
    assert no_off.devices[1].compute == rpc.devices[1].compute


def test_rpc_devices_become_gpus_in_llama_cpp_order():
    rpc = (("RPC0", 20 * GIB, 24 * GIB), ("RPC1", 10 * GIB, 12 * GIB))
    hw = probe(PlanOptions(ram="64GiB", threads=4), rpc_devices=rpc, nvml=FakeNoNvml)
    assert [(g.device_name, g.free, g.op_offload) for g in hw.gpus] == [("RPC0", 20 * GIB, False),
                                                                         ("RPC1", 10 * GIB, False)]
    given = probe(PlanOptions(gpu_mem="8GiB,24GiB", ram="64GiB", threads=4), rpc_devices=rpc[:1])
    assert [(g.device_name, g.free, g.op_offload) for g in given.gpus] == [("RPC0", 8 * GIB, False),
                                                                           ("CUDA1", 24 * GIB, True)]


class FakeNoNvml:
    """nvidia-ml-py on a machine without an NVIDIA driver."""

    @staticmethod
    def nvmlInit():
        raise OSError("no driver")


@needs_rpc
def test_llama_cpp_default_devices_include_a_registered_rpc_server(mid, cpu_run):
    """A placement without per-device predictions leaves the device list to llama.cpp, which must see the
    server registered through glmlocal.llama (one ggml instance: the wheel ships libggml.so and
    libggml.so.0 as two copies, and registering in the wrong one made the server invisible)."""
    res = run_child(gguf=mid, gpu_mib=[30], ctx=1024, naive=True, no_repack=True)
    assert res["engine_devices"] is None and res["by_device"]["RPC0"]["model"] > 40 * MIB
    assert res["tokens"] == cpu_run["tokens"]


@needs_rpc
def test_a_plan_made_for_cuda_names_maps_to_the_gpu_devices_llama_cpp_has(mid, cpu_run):
    """A plan from `--gpu-mem` names its GPU "CUDA0"; the engine gives llama.cpp its first GPU-type device."""
    res = run_child(gguf=mid, gpu_mib=[30], ctx=1024, generic_names=True, no_repack=True)
    assert [d["name"] for d in res["devices"]] == ["CUDA0", "CPU"] and res["engine_devices"] == ["RPC0"]
    assert res["by_device"]["RPC0"]["model"] == pytest.approx(res["devices"][0]["weights"], rel=0.05)
    assert res["tokens"] == cpu_run["tokens"]


@needs_rpc
def test_a_plan_for_more_gpus_than_llama_cpp_has_is_refused(mid):
    res = run_child(gguf=mid, gpu_mib=[26, 26], servers=1, ctx=1024)
    assert res["error"] == "EngineError" and "uses 2 GPUs" in res["message"] and "tokens" not in res


@needs_rpc
def test_hardware_probe_registers_rpc_servers_as_gpus(mid):
    """`PlanOptions(rpc=("HOST:PORT",))` (what a `--rpc` option fills in): probe registers the servers, and
    the plan uses them as GPUs without op offload, under their llama.cpp names; it loads as planned."""
    res = run_child(gguf=mid, gpu_mib=[26, 26], ctx=1024, probe_rpc=True)
    assert [d["name"] for d in res["devices"]] == ["RPC0", "RPC1", "CPU"] and res["engine_devices"] == ["RPC0", "RPC1"]
    for dev in res["devices"][:2]:
        got = res["by_device"][dev["name"]]
        assert close(dev["weights"], got["model"]) and close(dev["compute"], got["compute"])


@needs_rpc
def test_a_planned_cpu_only_placement_stays_off_the_gpus(mid, cpu_run):
    """With an RPC device registered but a CPU-only plan, the engine gives llama.cpp no device at all:
    otherwise it would put compute buffers (and big-batch work) on a device the plan never counted."""
    res = run_child(gguf=mid, gpu_mib=[], servers=1, ctx=1024, no_repack=True)
    assert res["gpu_devices"] == ["RPC0"] and res["engine_devices"] == []
    assert set(res["by_device"]) == {"CPU"} and res["tokens"] == cpu_run["tokens"]
