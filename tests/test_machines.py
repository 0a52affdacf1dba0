"""Unified memory in the planner, machine profiles (machines.toml) and `glmlocal plan --machine / --machines`.

Plans for each profile have their numbers worked out by hand below, from the footprint the registry and our
quant recipe give (GLM-4.5-Air q4_k_m: 70,438,853,120 bytes of weights of which 349,175,808 are the token
embeddings, which stay in RAM, and 66,022,539,264 routed experts; f16 KV 188,416 bytes per token) and the
planner's stated constants: 1 GiB margin per GPU, 2 GiB reserved for the OS, speed = 1 / sum(bytes read per
token / (bandwidth x 0.75 GPU, 0.6 CPU)), experts read 8/128 of their bytes, KV read at 4096 tokens.
Published measurements of real machines are compared with the estimates in the last test (README table).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import glmlocal.models.hub  # noqa: F401 (huggingface_hub reads HF_HUB_OFFLINE once, at import: not under our env)
from glmlocal.cli.app import app
from glmlocal.errors import InputError, PlanError
from glmlocal.models.registry import get_model
from glmlocal.plan.footprint import footprint_from_spec
from glmlocal.plan.hardware import GIB, probe
from glmlocal.plan.machines import MACHINES_PATH, get_machine, load_machines, machines
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.planner import plan, unified_raise
from glmlocal.plan.pool import with_gpu_limit
from tests.recorded import recorded, source

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
KV_AIR = 188_416  # f16 K+V bytes per token, 46 layers x 2 x 8 heads x 128 x 2 bytes
KV_46 = 376_832  # GLM-4.6: 92 layers
# The trunk alone, one sequence, llama.cpp's default ubatch: the arithmetic below (and the measurements it is
# compared with, plain decoding at -ub 512) predates MTP and the ubatch choice (tests/test_planner_mtp.py).
TRUNK = {"mtp": False, "n_ubatch": 512, "n_seq": 1}


def fp(model: str, quant: str = "q4_k_m"):
    return footprint_from_spec(get_model(model), quant)


def on(name: str):
    return probe(PlanOptions(machine=name))


@pytest.fixture(autouse=True)
def offline_store(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # published quants: only what the (empty) cache has


# ---------------------------------------------------------------------------------------------
# The planner on one pool
# ---------------------------------------------------------------------------------------------
def test_m4_max_128_holds_air_q4_k_m_entirely_on_the_gpu():
    """m4-max-128: GPU limit 107.52 GiB (Metal working set, macOS 26), 546 GB/s.
    Air q4_k_m on MTL0: weights 70,438,853,120 - 349,175,808 (embeddings) = 70,089,677,312
                        + KV 188,416 x 65,536 = 12,348,030,976 + compute 411,056,128 = 82,848,764,416 B (77.2 GiB)
                        <= 107.52 - 1 (margin) = 106.52 GiB: everything on the GPU, full 64K context, -ngl 48.
    Pool: 82,848,764,416 + CPU 366,559,232 (embeddings + buffers) <= 128 - 2 GiB.
    Read per token on MTL0: non-expert 3,557,906,944 + output 509,231,104 + experts 66,022,539,264 x 8/128
                        (4,126,408,704) + KV 188,416 x 4096 (771,751,936) = 8,965,298,688 B
    -> 546e9 x 0.75 / 8,965,298,688 = 45.7 tokens/s (the CPU reads nothing per token)."""
    f, hw = fp("glm-4.5-air"), on("m4-max-128")
    assert f.weights_bytes == 70_438_853_120 and f.token_embd == 349_175_808 and f.expert_bytes == 66_022_539_264
    p = plan(f, hw, **TRUNK)
    gpu, cpu = p.devices
    assert gpu.name == "MTL0" and p.n_ctx == 65536 and p.n_gpu_layers == 48 and p.tensor_overrides == []
    assert gpu.weights == 70_089_677_312 and gpu.kv == KV_AIR * 65536 == 12_348_030_976
    assert gpu.total == 82_848_764_416 and gpu.capacity == int(107.52 * GIB)
    assert cpu.weights == f.token_embd and cpu.layers == () and cpu.expert_layers == ()
    assert cpu.capacity == 128 * GIB - gpu.total  # the pool less what the GPU holds: counted once
    assert gpu.bytes_per_token == 3_557_906_944 + 509_231_104 + 66_022_539_264 * 8 // 128 + KV_AIR * 4096
    assert gpu.bytes_per_token == 8_965_298_688 and cpu.bytes_per_token == 0
    assert p.est_tokens_per_s == pytest.approx(546e9 * 0.75 / 8_965_298_688) == pytest.approx(45.68, abs=0.01)
    assert any(n.startswith("unified memory: one 128.0 GiB pool; the GPU may use 107.5 GiB") for n in p.notes)
    assert not any("raising" in n for n in p.notes)


def test_weights_count_once_in_the_pool():
    """dgx-spark: one 121.69 GiB pool (MemTotal 127600748 kB), all of it usable by the GPU, 273 GB/s.
    Air q8_0: 113,602,894,336 B of weights (105.8 GiB). Counted twice (a GPU copy plus the mmapped file in RAM)
    it would need 211.6 GiB and not fit; counted once: GPU 125,702,427,136 (weights 112,943,340,032 + KV
    12,348,030,976 + compute 411,056,128) + CPU 676,937,728 = 126.4e9 <= 121.69 GiB - 2 GiB = 128.5e9."""
    f, hw = fp("glm-4.5-air", "q8_0"), on("dgx-spark")
    assert f.weights_bytes == 113_602_894_336 and 2 * f.weights_bytes > hw.unified.pool
    p = plan(f, hw, **TRUNK)
    gpu, cpu = p.devices
    assert gpu.name == "CUDA0" and p.n_ctx == 65536 and cpu.layers == () and cpu.expert_layers == ()
    assert gpu.total == 125_702_427_136 and cpu.total == 676_937_728
    assert gpu.total + cpu.total <= hw.unified.pool - 2 * GIB
    # 273e9 x 0.75 / (non-expert + output + experts x 8/128 + KV at 4096) = 204.75e9 / 14,447,712,768 = 14.2
    assert gpu.bytes_per_token == 14_447_712_768 and p.est_tokens_per_s == pytest.approx(14.17, abs=0.01)
    # 128K tokens of KV (24.7e9 B) no longer fit the pool: the error speaks of one pool, not VRAM + RAM.
    with pytest.raises(PlanError) as e:
        plan(f, hw, ctx=131072)
    assert "one unified pool" in e.value.message and "119.7 GiB usable" in e.value.message
    assert "largest context that fits" in e.value.hint


def test_raising_the_metal_limit_is_offered_with_the_command():
    """m3-ultra-256: limit 192 GiB (3/4 of RAM, assumed), at most 256 - 256/8 = 224 GiB when raised.
    GLM-4.6 q4_k_m all on the GPU needs weights 212,726,947,456 - 436,469,760 (embeddings) + KV 376,832 x
    65,536 (24,696,061,952) + compute + 1 GiB margin = 222.1 GiB -> 223 GiB = 228352 MiB (31 GiB more)."""
    f, hw = fp("glm-4.6"), on("m3-ultra-256")
    p = plan(f, hw, **TRUNK)
    assert p.devices[-1].expert_layers  # at 192 GiB some experts run on the CPU (from the same RAM)
    note = next(n for n in p.notes if n.startswith("raising"))
    assert note == ("raising the GPU limit by 31.0 GiB to 223 GiB puts the whole model on the GPU: "
                    "sudo sysctl iogpu.wired_limit_mb=228352 (until reboot)")
    assert unified_raise(f, hw) == 223 * GIB
    raised = plan(f, with_gpu_limit(hw, 223 * GIB), **TRUNK)
    gpu, cpu = raised.devices
    need = f.weights_bytes - f.token_embd + KV_46 * 65536 + gpu.compute + GIB
    assert need / GIB == pytest.approx(222.10, abs=0.01) and gpu.total + GIB == need
    assert cpu.layers == () and cpu.expert_layers == () and raised.est_tokens_per_s > p.est_tokens_per_s


def test_raising_the_gtt_on_strix_halo():
    """strix-halo-128: GTT 64 GiB (half of RAM, the kernel default), 256 GB/s. Air q4_k_m on the GPU needs
    82,848,764,416 B + 1 GiB = 78.2 GiB -> 79 GiB = 79 x 262,144 pages of 4 KiB = 20,709,376 (ttm.pages_limit),
    15 GiB more; within 124 GiB (kyuz0's ttm.pages_limit=32505856). At 64 GiB 12 MoE layers' experts stay on
    the CPU (about 16.4e9 B, read at the assumed 128 GB/s)."""
    f, hw = fp("glm-4.5-air"), on("strix-halo-128")
    p = plan(f, hw, **TRUNK)
    gpu, cpu = p.devices
    assert gpu.name == "Vulkan0" and gpu.total <= 63 * GIB and len(cpu.expert_layers) == 12
    assert gpu.total + cpu.total <= 126 * GIB
    note = next(n for n in p.notes if n.startswith("raising"))
    assert note.startswith("raising the GPU limit by 15.0 GiB to 79 GiB puts the whole model on the GPU: ")
    assert note.endswith("ttm.pages_limit=20709376 ttm.page_pool_size=20709376 (then reboot)")
    assert 79 * GIB // 4096 == 20_709_376
    # Raised as the measured machines were (124 GiB): all on the GPU, 256e9 x 0.75 / 8,965,298,688 = 21.4 t/s.
    raised = plan(f, with_gpu_limit(hw, 124 * GIB), **TRUNK)
    assert raised.devices[1].expert_layers == () and raised.est_tokens_per_s == pytest.approx(21.42, abs=0.01)


def test_a_limit_that_cannot_be_raised_far_enough_is_said():
    """m4-max-128 with Air q8_0: all on the GPU would need 118.1 GiB; macOS keeps 16 GiB, so 112 GiB is the
    most (ds4#893 set 114688 MiB). The plan runs 6 MoE layers' experts (and part of one) on the CPU instead."""
    p = plan(fp("glm-4.5-air", "q8_0"), on("m4-max-128"), **TRUNK)
    assert ("the whole model on the GPU needs a 118.1 GiB GPU limit; the most the planned machine (m4-max-128) "
            "allows is 112 GiB") in p.notes
    assert p.devices[-1].expert_layers and unified_raise(fp("glm-4.5-air", "q8_0"), on("m4-max-128")) is None


def test_discrete_gpu_plans_are_unchanged_by_profiles():
    """rtx4090-128gb is `--gpu-mem 24564MiB --ram 128GiB --gpu-bw 1008 --cpu-bw 89.6 --threads 16`."""
    given = probe(PlanOptions(gpu_mem="24564MiB", ram="128GiB", gpu_bw=1008, cpu_bw=89.6, threads=16))
    a, b = plan(fp("glm-4.5-air"), on("rtx4090-128gb")), plan(fp("glm-4.5-air"), given)
    assert on("rtx4090-128gb").unified is None
    assert [(d.weights, d.kv, d.compute, d.capacity) for d in a.devices] == [
        (d.weights, d.kv, d.compute, d.capacity) for d in b.devices]
    assert a.llama_cpp_flags() == b.llama_cpp_flags() and a.est_tokens_per_s == b.est_tokens_per_s


# ---------------------------------------------------------------------------------------------
# Profiles as data
# ---------------------------------------------------------------------------------------------
def test_shipped_profiles_carry_the_recorded_numbers():
    ms = machines()
    assert {"m4-max-128", "m3-ultra-256", "m3-ultra-512", "strix-halo-128", "dgx-spark", "rtx4090-128gb",
            "2x3090-128gb", "rtx5090-256gb"} <= set(ms)
    # recommendedMaxWorkingSetSize as llama.cpp logged it (value / 1e6 "MB"): 115448.73 MB and 498216.21 MB.
    logs = recorded("llama-metal-init-logs.txt")
    assert "recommendedMaxWorkingSetSize  = 115448.73 MB" in logs and "= 498216.21 MB" in logs
    assert ms["m4-max-128"].gpu_limit / 1e6 == pytest.approx(115448.73, abs=0.01)
    assert ms["m3-ultra-512"].gpu_limit / 1e6 == pytest.approx(498216.21, abs=0.01)
    assert ms["m4-max-128"].gpu_limit_max == 112 * GIB  # iogpu.wired_limit_mb=114688 (ds4#893)
    assert ms["strix-halo-128"].gpu_limit_max == 32_505_856 * 4096  # kyuz0: ttm.pages_limit=32505856
    assert "127600748 kB" in recorded("dgx-spark-memory.txt") and ms["dgx-spark"].memory == int(121.69 * GIB)
    assert [g.vram for g in ms["2x3090-128gb"].gpus] == [24576 * MIB] * 2  # nvidia-smi 24576MiB
    assert ms["rtx4090-128gb"].gpus[0].vram == 24564 * MIB and ms["rtx4090-128gb"].gpus[0].bandwidth == 1008e9
    # The package ships the same bytes (glmlocal/machines.toml links to the root file; pyproject lists it).
    assert (ROOT / "glmlocal" / "machines.toml").read_bytes() == (ROOT / "machines.toml").read_bytes()
    assert MACHINES_PATH == (ROOT / "glmlocal" / "machines.toml").resolve() or MACHINES_PATH.name == "machines.toml"
    assert '"machines.toml"' in (ROOT / "pyproject.toml").read_text()


def test_unknown_machine_lists_the_known_ones():
    with pytest.raises(InputError) as e:
        get_machine("m5-max-128")
    assert "unknown machine 'm5-max-128'" in e.value.one_line()
    assert e.value.hint.startswith("known machines: m1-max-64, m4-max-128, m3-ultra-256")
    assert get_machine("M4-MAX-128").name == "m4-max-128"


GOOD = """
schema = 1
[machines.box]
display = "a box"
backend = "cuda"
memory_gib = 64
cpu_bandwidth_gbs = 50
cores = 8
gpus = [{ name = "GPU", vram_mib = 24576, bandwidth_gbs = 900 }]
"""


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("memory_gib = 64\n", ""), "machines.toml: machine 'box' has no 'memory_gib'"),
    (lambda t: t.replace("cores = 8\n", ""), "machine 'box' has no 'cores'"),
    (lambda t: t.replace('gpus = [{ name = "GPU", vram_mib = 24576, bandwidth_gbs = 900 }]\n', ""),
     "machine 'box' has no 'gpus'"),
    (lambda t: t.replace("vram_mib = 24576, ", ""), "machine 'box' gpus[0] has no 'vram_mib'"),
    (lambda t: t.replace("gpus = [", "unified = true\ngpu_bandwidth_gbs = 200\ngpus = ["),
     "machine 'box' has no 'gpu_limit_gib'"),
    (lambda t: t.replace("memory_gib = 64", 'memory_gib = "lots"'), "memory_gib must be a positive number"),
    (lambda t: t.replace('backend = "cuda"', 'backend = "opencl"'), "backend must be one of metal, cuda"),
    (lambda t: t.replace("[machines.box]", "[machines.box"), "not valid TOML"),
])
def test_a_bad_profile_is_one_line_naming_the_field(tmp_path, edit, needle):
    path = tmp_path / "machines.toml"
    assert load_machines(_write(path, GOOD))["box"].gpus[0].vram == 24576 * MIB
    with pytest.raises(InputError) as e:
        load_machines(_write(path, edit(GOOD)))
    line = e.value.one_line()
    assert needle in line and "\n" not in line


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
def cli(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def test_plan_for_a_named_machine():
    r = cli("glm-4.5-air", "--machine", "m4-max-128", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    p = doc["placement"]
    assert [d["name"] for d in p["devices"]] == ["MTL0", "CPU"] and p["n_ctx"] == 65536 and p["n_gpu_layers"] == 48
    assert doc["hardware"]["unified"]["pool"] == 128 * GIB and doc["hardware"]["cores"] == 12
    assert p["est_tokens_per_s"] == pytest.approx(45.68, abs=0.01)
    text = cli("glm-4.6", "--machine", "m3-ultra-256")
    assert text.exit_code == 0 and "sudo sysctl iogpu.wired_limit_mb=228352" in text.stdout
    assert "machine profile m3-ultra-256" in text.stdout
    fewer = json.loads(cli("glm-4.5-air", "--machine", "m4-max-128", "--threads", "8", "--json").stdout)
    assert fewer["hardware"]["cores"] == 8


@pytest.mark.parametrize("args,needle", [
    (["--machine", "nope"], "known machines: m1-max-64, m4-max-128"),
    (["--machine", "m4-max-128", "--gpu-mem", "24GiB"], "drop --gpu-mem"),
    (["--machines", "--ram", "64GiB"], "--machines plans for every profile"),
])
def test_machine_errors_are_one_line(args, needle):
    r = cli("glm-4.5-air", *args)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_machines_table_for_air():
    """The best quant per profile (offline: our q4_k_m / q6_k / q8_0 only; the published ones are reported as not
    sized). m1-max-64: even q4_k_m (65.6 GiB of weights) exceeds the 62 GiB pool; m4-max-128: q8_0 needs a
    118.1 GiB limit (> 112), q6_k fits under 107.52 GiB; strix-halo-128: q8_0 after raising the GTT to 119 GiB;
    discrete boxes: q8_0 with experts in RAM and the full context."""
    r = cli("glm-4.5-air", "--machines", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {m["machine"]: m for m in doc["machines"]}
    assert doc["candidates"] == ["q8_0", "q6_k", "q4_k_m"]
    assert set(doc["unsized"]) == {"ud-q2_k_xl", "q3_k_m", "ud-q3_k_xl", "ud-q4_k_xl"}
    best = {name: (m["quant"], m["clean"], m["n_ctx"]) for name, m in rows.items()}
    assert best["m1-max-64"] == (None, False, None) and "62.0 GiB usable" in rows["m1-max-64"]["why"]
    assert best["m4-max-128"] == ("q6_k", True, 65536)
    assert best["m3-ultra-256"] == best["m3-ultra-512"] == best["dgx-spark"] == ("q8_0", True, 65536)
    assert best["strix-halo-128"] == ("q8_0", True, 65536) and rows["strix-halo-128"]["gpu_limit_raised_to"] == 119 * GIB
    assert rows["strix-halo-128"]["est_tokens_per_s_without_raise"] < rows["strix-halo-128"]["est_tokens_per_s"]
    for name in ("rtx4090-128gb", "2x3090-128gb", "rtx5090-256gb"):
        assert best[name] == ("q8_0", True, 65536)
    # Each row is the plan `--machine NAME --quant Q` makes.
    same = plan(fp("glm-4.5-air", "q6_k"), on("m4-max-128"), mtp=False)  # the table compares models, not MTP
    assert rows["m4-max-128"]["est_tokens_per_s"] == pytest.approx(same.est_tokens_per_s)
    assert rows["m4-max-128"]["llama_cpp_flags"] == same.llama_cpp_flags()
    table = CliRunner().invoke(app, ["plan", "glm-4.5-air", "--machines"], env={"COLUMNS": "240"})
    assert table.exit_code == 0
    for text in ("GLM-4.5-Air on every machine profile", "strix-halo-128", "ttm.pages_limit", "not sized"):
        assert text in table.stdout, text


def test_machines_table_with_a_quant_and_for_glm46():
    r = json.loads(cli("glm-4.6", "--machines", "--quant", "q4_k_m", "--json").stdout)
    rows = {m["machine"]: m for m in r["machines"]}
    assert r["candidates"] == ["q4_k_m"] and r["unsized"] == {}
    assert rows["m3-ultra-512"]["clean"] and rows["m3-ultra-256"]["gpu_limit_raised_to"] == 223 * GIB
    assert not rows["m4-max-128"]["fits"] and not rows["2x3090-128gb"]["fits"]
    five = rows["rtx5090-256gb"]  # 32 GiB cannot hold 92 layers' attention + 64K of KV: context shrinks
    assert five["fits"] and not five["clean"] and five["n_ctx"] < 65536


def test_published_quants_join_the_table_from_their_headers(fakehub, ud_parts):
    """A published-only quant is sized from its GGUF headers (the fake hub serves a real split GGUF under
    unsloth's GLM-4.6 UD-Q2_K_XL name; it is a tiny model, so it fits everywhere) and becomes the best
    quant where nothing larger fits; quants the hub does not have are reported as not sized."""
    fakehub.add_repo("unsloth/GLM-4.6-GGUF", {f"UD-Q2_K_XL/{p.name}": p for p in ud_parts})
    r = cli("glm-4.6", "--machines", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {m["machine"]: m for m in doc["machines"]}
    assert "ud-q2_k_xl" in doc["candidates"] and "ud-q2_k_xl" not in doc["unsized"]
    assert "ud-q4_k_xl" in doc["unsized"]
    assert rows["m4-max-128"]["quant"] == "ud-q2_k_xl" and rows["m4-max-128"]["published"]
    assert rows["m3-ultra-512"]["quant"] == "q8_0" and not rows["m3-ultra-512"]["published"]


@pytest.fixture(scope="module")
def ud_parts(gguf_factory, tmp_path_factory):
    from tests.fakehub import split_gguf

    out = tmp_path_factory.mktemp("ud46")
    return split_gguf(Path(gguf_factory("tiny", "q4_k_m")), out, "GLM-4.6-UD-Q2_K_XL", 2)


# ---------------------------------------------------------------------------------------------
# Published measurements next to the planner's estimate (the README table)
# ---------------------------------------------------------------------------------------------
def tg128(name: str, occurrence: int = 0) -> float:
    """The tg128 tokens/s of a recorded llama-bench table."""
    return [float(m.group(1)) for m in re.finditer(r"tg128 \|\s+([\d.]+) ±", recorded(name))][occurrence]


def test_estimates_next_to_published_measurements():
    """Strix Halo (Ryzen AI Max+ 395, 128 GB, GTT raised to 124 GiB; kyuz0/amd-strix-halo-toolboxes logs),
    GLM-4.5-Air UD-Q4_K_XL (68.01 GiB) next to our q4_k_m (65.6 GiB of weights), UD-Q6_K_XL next to q6_k.
    The planner's 0.75 x 256 GB/s lands within 15% of what Vulkan and ROCm decode at (tg128, depth 0)."""
    assert "kyuz0/amd-strix-halo-toolboxes" in source("llama-bench-vulkan-radv-strix-halo-glm45air.txt")
    measured = {"vulkan-radv": tg128("llama-bench-vulkan-radv-strix-halo-glm45air.txt"),
                "vulkan-amdvlk": tg128("llama-bench-vulkan-amdvlk-strix-halo-glm45air.txt"),
                "rocm-6.4.4": tg128("llama-bench-hip-strix-halo-glm45air.txt")}
    assert measured == {"vulkan-radv": 24.64, "vulkan-amdvlk": 24.21, "rocm-6.4.4": 20.93}
    strix = with_gpu_limit(on("strix-halo-128"), 124 * GIB)
    q4 = plan(fp("glm-4.5-air"), strix, **TRUNK).est_tokens_per_s
    assert q4 == pytest.approx(21.42, abs=0.01)  # 256e9 x 0.75 / 8,965,298,688
    assert all(0.85 < q4 / m < 1.15 for m in measured.values())
    q6 = plan(fp("glm-4.5-air", "q6_k"), strix, **TRUNK).est_tokens_per_s
    assert q6 == pytest.approx(16.09, abs=0.01) and tg128("llama-bench-vulkan-radv-strix-halo-glm45air-q6.txt") == 17.71


def test_estimates_for_the_other_published_rows():
    """The README table's other rows (facts gathered for issue 17; secondary sources where marked there):
    - Mac Studio M3 Ultra 512 GB, GLM-4.6 UD-Q8_K_XL (363 GB), llama.cpp: 13.82 tok/s (X posts quoted in a
      Chinese article): m3-ultra-512 with our q8_0 (379 GB), all on the GPU -> 819e9 x 0.75 / read = 16.7.
    - Ryzen 9 9950X + 256 GB DDR5-6000 + RTX 5090, GLM-4.7 (MXFP4 or Q4_0), experts on the CPU: 6.17 tok/s
      (postl.ai): rtx5090-256gb with q4_k_m -> 5.4 (context shrinks to 58624 to keep attention on the card).
    - 2x RTX 3060 12 GB + 96 GB DDR5-5600, GLM-4.5-Air Q4_K_S, all experts on the CPU (-ncmoe 99): 10.83 tok/s:
      the planner, free to put some experts on the cards (360 GB/s each), estimates 11.2 for q4_k_m.
    - Strix Halo with the 96 GB GPU setting (Minisforum MS-S1 MAX, Windows, Vulkan): 22.79; at 96 GiB Air
      q4_k_m (77.2 GiB) is all on the GPU: 21.4, as with 124 GiB."""
    m3u = plan(fp("glm-4.6", "q8_0"), on("m3-ultra-512"), **TRUNK)
    assert m3u.devices[-1].expert_layers == () and m3u.est_tokens_per_s == pytest.approx(16.75, abs=0.01)
    five = plan(fp("glm-4.7"), on("rtx5090-256gb"), **TRUNK)
    assert five.n_ctx == 58624 and five.est_tokens_per_s == pytest.approx(5.43, abs=0.01)
    two3060 = probe(PlanOptions(gpu_mem="12GiB,12GiB", ram="96GiB", gpu_bw=360, cpu_bw=89.6, threads=12))
    assert plan(fp("glm-4.5-air"), two3060, **TRUNK).est_tokens_per_s == pytest.approx(11.16, abs=0.01)
    ms1 = plan(fp("glm-4.5-air"), with_gpu_limit(on("strix-halo-128"), 96 * GIB), **TRUNK)
    assert ms1.devices[-1].expert_layers == () and ms1.est_tokens_per_s == pytest.approx(21.42, abs=0.01)
