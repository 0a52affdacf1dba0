"""glmlocal doctor: the smoke test runs a real tiny Q4_K_M model in a child; crashes and hangs in the child
are reported with the fix; the build is checked against this CPU's instruction sets and the GPUs present."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmlocal.doctor import checks as doctor
from glmlocal.doctor.build import cpu_cmake_args, cpu_flags, unsupported_features
from glmlocal.doctor.checks import ChildResult, backend_check, smoke_check
from glmlocal.plan.hardware import GPU


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


def test_cpu_only_build_on_a_gpu_machine_prints_the_cuda_rebuild(monkeypatch):
    monkeypatch.setattr(doctor, "cpu_flags", lambda *a: set())
    info = ChildResult({"backends": ["CPU"], "system_info": "", "devices": []}, 0, None, False, "")
    gpu = GPU(0, "NVIDIA RTX 4090", 24 << 30, 23 << 30, 1e12)
    c = backend_check(info, [gpu])
    assert c.status == "fail" and "-DGGML_CUDA=on" in c.fix and "--force-reinstall" in c.fix
    ok = backend_check(ChildResult({"backends": ["CUDA", "CPU"], "system_info": "", "devices": []}, 0, None, False,
                                   ""), [gpu])
    assert ok.status == "ok"
    assert backend_check(info, []).status == "ok"


def test_child_needs_no_torch(tmp_path):
    # Doctor runs on a user install without the test extra: make importing torch fail in the child.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from glmlocal.doctor.checks import _child_main; sys.exit(_child_main(['smoke', sys.argv[1]]))")
    res = doctor.run_child([sys.executable, "-c", code, str(tmp_path)], timeout=300)
    assert res.returncode == 0 and res.result["ok"], res.output[-2000:]


@pytest.mark.slow
def test_cli_doctor(tmp_path):
    smoke = subprocess.run([sys.executable, "-m", "glmlocal", "doctor", "--smoke-only"], check=False, capture_output=True,
                           text=True, timeout=600)
    assert smoke.returncode == 0 and "smoke test" in smoke.stdout
    full = subprocess.run([sys.executable, "-m", "glmlocal", "doctor", "--json"], check=False, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "GLMLOCAL_HOME": str(tmp_path)})
    checks = {c["name"]: c for c in json.loads(full.stdout)}
    assert set(checks) == {"llama.cpp build", "GPUs", "RAM", "disk", "smoke test"}
    assert checks["smoke test"]["status"] == "ok" and checks["llama.cpp build"]["status"] == "ok"
    assert str(tmp_path) in checks["disk"]["detail"]
    assert full.returncode == 0


def test_cmake_args_need_only_the_standard_library():
    # .ci/run can ask for this CPU's flags before anything is installed: -S hides site-packages.
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-S", "-m", "glmlocal.doctor", "--cmake-args"], cwd=repo, check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == cpu_cmake_args()


def test_ram_is_judged_with_vram():
    gib = 1 << 30
    assert doctor.ram_check(24 * gib, 20 * gib).status == "warn"
    assert doctor.ram_check(64 * gib, 60 * gib, vram=24 * gib).status == "ok"
    assert doctor.ram_check(128 * gib, 100 * gib).status == "ok"
