"""`glmlocal doctor`: checks what silently breaks local runs, each with the fix.

Everything that touches llama.cpp runs in a child process (`python -m glmlocal.doctor --child ...`), so a
build that dies with SIGILL/SIGSEGV (e.g. a -march=native wheel on a CPU that advertises AMX) is reported
with the rebuild command instead of killing the doctor. Works on a fresh install: no model, no torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from glmlocal.doctor.build import (
    BuildChoice,
    choose_build,
    cpu_flags,
    rebuild_command,
    unsupported_features,
)
from glmlocal.doctor.memory import disk_check, ram_check
from glmlocal.doctor.result import Check
from glmlocal.plan.view import gib

__all__ = ["Check", "backend_check", "disk_check", "gpu_check", "ram_check", "run_checks", "smoke_check"]
# After installing a GPU toolkit: the flags are chosen again, for what is installed then.
REBUILD_FOR_THIS_MACHINE = rebuild_command("$(python3 -m glmlocal.doctor --cmake-args)")


# ---------------------------------------------------------------------------------------------
# Child process (the only place llama.cpp is imported)
# ---------------------------------------------------------------------------------------------
def _child_info() -> dict:
    from glmlocal.llama import ggml

    return {"backends": ggml.backend_names(), "system_info": ggml.system_info(),
            "devices": [asdict(d) for d in ggml.devices()]}


def _child_smoke(workdir: Path) -> dict:
    """Write the tiny random Q4_K_M model, load it on every device this build has, generate greedily."""
    import numpy as np

    from glmlocal.engine.engine import Engine
    from glmlocal.engine.generation import Sampling
    from glmlocal.plan.planner import Placement
    from quantize.tiny import write_tiny_gguf

    t0 = time.perf_counter()
    path = write_tiny_gguf(workdir / "doctor-tiny-q4_k_m.gguf", quant="q4_k_m")
    placement = Placement.cpu_only(ctx=512, threads=min(4, os.cpu_count() or 1))
    gpu = any(d["type"] in ("GPU", "IGPU") for d in _child_info()["devices"])
    if gpu:  # exercise the GPU backend too: a broken CUDA build must fail here as well
        from dataclasses import replace

        placement = replace(placement, n_gpu_layers=999)
    with Engine.load(path, placement) as eng:
        prompt = eng.tokenize("[gMASK]<sop><|user|>\nhello doctor<|assistant|>")
        outs = list(eng.generate(prompt, Sampling(temperature=0, logit_bias={t: -1e9 for t in eng.eog_ids}),
                                 max_tokens=16, want_logits=True))
        finite = all(np.isfinite(o.logits).all() for o in outs)
        stats = outs[-1].stats
        return {"ok": finite and len(outs) == 16, "finite_logits": finite, "tokens": [o.token for o in outs],
                "buffers": eng.report.buffers, "tokens_per_s": stats.tokens_per_s,
                "seconds": time.perf_counter() - t0, "gpu": gpu}


def _child_main(argv: Sequence[str]) -> int:
    mode = argv[0]
    result = _child_info() if mode == "info" else _child_smoke(Path(argv[1]))
    sys.stdout.write("\n@@DOCTOR@@" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------
@dataclass
class ChildResult:
    """How a child ended: a parsed result, an exit code, or the signal that killed it."""

    result: dict | None
    returncode: int | None
    signal_name: str | None
    timed_out: bool
    output: str


def run_child(argv: Sequence[str], timeout: float = 300.0) -> ChildResult:
    """Run argv, capture output, and report a crash by signal name instead of propagating it."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return ChildResult(None, None, None, True, out)
    out = (proc.stdout or "") + (proc.stderr or "")
    sig = None
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
    result = None
    marker = (proc.stdout or "").rfind("@@DOCTOR@@")
    if marker >= 0 and proc.returncode == 0:
        try:
            result = json.loads(proc.stdout[marker + len("@@DOCTOR@@"):].strip().splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            result = None
    return ChildResult(result, proc.returncode, sig, False, out)


def _child_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "glmlocal.doctor", "--child", *args]


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def smoke_check(timeout: float = 300.0, argv_factory: Callable[[str], list[str]] | None = None,
                choice: BuildChoice | None = None) -> Check:
    """The end-to-end test: a tiny random Q4_K_M model evaluated by the installed llama.cpp, in a child."""
    with tempfile.TemporaryDirectory(prefix="glmlocal-doctor-") as tmp:
        argv = argv_factory(tmp) if argv_factory else _child_argv("smoke", tmp)
        res = run_child(argv, timeout)
    fix_cpu = rebuild_command((choice or choose_build()).args)  # this CPU's flags, and this machine's GPU backend
    if res.signal_name:
        return Check("smoke test", "fail",
                     f"llama.cpp crashed with {res.signal_name} evaluating a quantized (Q4_K_M) model: the "
                     "installed llama-cpp-python was built for instructions this CPU does not run correctly "
                     "(typically a -march=native or cached wheel)", fix=fix_cpu,
                     data={"signal": res.signal_name, "output": _tail(res.output)})
    if res.timed_out:
        return Check("smoke test", "fail", f"tiny model generation did not finish in {timeout:.0f} s",
                     fix=fix_cpu, data={"output": _tail(res.output)})
    if res.result is None:
        return Check("smoke test", "fail", f"smoke test failed (exit {res.returncode}): {_tail(res.output, 3)}",
                     fix=fix_cpu, data={"output": _tail(res.output, 20)})
    r = res.result
    if not r.get("ok"):
        return Check("smoke test", "fail", "llama.cpp produced non-finite logits on a Q4_K_M model", fix=fix_cpu,
                     data=r)
    where = "GPU + CPU" if r.get("gpu") else "CPU"
    return Check("smoke test", "ok", f"tiny Q4_K_M model generated {len(r['tokens'])} tokens on {where} "
                 f"({r['tokens_per_s']:.0f} tok/s, {r['seconds']:.1f} s total)", data=r)


def backend_check(info: ChildResult, gpus: list, choice: BuildChoice | None = None) -> Check:
    """Which ggml backends the build has, against the GPUs the machine has and the build it should have
    (doctor/build.choose_build: CUDA, HIP, Metal, Vulkan or CPU, for this machine's toolkits and GPUs)."""
    choice = choice or choose_build()
    rebuild = rebuild_command(choice.args)
    if info.signal_name or info.result is None:
        return Check("llama.cpp build", "fail",
                     f"could not load llama-cpp-python ({info.signal_name or _tail(info.output, 2)})", fix=rebuild)
    backends = info.result["backends"]
    names = ", ".join(backends)
    missing = unsupported_features(info.result.get("system_info", ""), cpu_flags())
    if missing:
        return Check("llama.cpp build", "fail",
                     f"llama-cpp-python was compiled for {', '.join(missing)}, which this CPU does not have: "
                     "it will crash (SIGILL) on quantized models", fix=rebuild, data=info.result)
    gpu_backends = [b for b in backends if b.upper() not in ("CPU", "BLAS", "RPC")]
    if not gpu_backends and (gpus or choice.backend != "cpu"):
        has = f"{len(gpus)} GPU(s) ({', '.join(g.name for g in gpus)})" if gpus else f"a {choice.backend} GPU"
        fix = rebuild if choice.backend != "cpu" else f"{choice.reason.split(': ', 1)[-1]}; then {REBUILD_FOR_THIS_MACHINE}"
        return Check("llama.cpp build", "fail",
                     f"llama-cpp-python was built with backends [{names}] only, but this machine has {has}: "
                     f"nothing will be offloaded (the build for it: {choice.reason})", fix=fix, data=info.result)
    sysinfo = info.result.get("system_info", "").replace("CPU :", "")
    kernels = [p.split("=")[0].strip() for p in sysinfo.split("|") if p.strip().endswith("= 1")]
    return Check("llama.cpp build", "ok", f"backends: {names}; CPU kernels: {' '.join(kernels) or 'baseline'}",
                 data=info.result)


def gpu_check(gpus: list, notes: Sequence[str]) -> Check:
    """The GPUs llama.cpp will offload to (its device registry; NVML's list when the build has no GPU backend)."""
    if not gpus:
        extra = f" ({'; '.join(notes)})" if notes else ""
        return Check("GPUs", "warn", f"no GPU that llama.cpp can use: models run on the CPU{extra}")
    desc = "; ".join(f"{g.device_name} {g.name}: {gib(g.free)} of {gib(g.total)} free"
                     + (" (shared with RAM)" if g.unified else "") for g in gpus)
    busy = [g for g in gpus if g.total and g.free < 0.5 * g.total and not g.unified]
    if busy:
        return Check("GPUs", "warn", desc + " (less than half free: other processes hold VRAM)",
                     fix="close the other GPU programs (nvidia-smi, rocm-smi or nvtop lists them) before loading a model")
    return Check("GPUs", "ok", desc + (f" ({'; '.join(notes)})" if notes else ""))


def _gpus(info: ChildResult, ram_total: int) -> tuple[list, list[str]]:
    """This machine's GPUs as llama.cpp sees them, from the device list the child read (the parent never loads
    llama.cpp: a crashing build must not take the doctor down); NVML's when the child could not say."""
    from glmlocal.llama.ggml import Device
    from glmlocal.plan.devices import local_gpus

    devices = [Device(**d) for d in (info.result or {}).get("devices", [])]
    gpus, _, notes = local_gpus(ram_total, devices=devices)
    return gpus, notes


def run_checks(*, smoke: bool = True, on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """All checks in order; on_check is called as each one completes (the CLI renders them live)."""
    import psutil

    from glmlocal.models import store
    from glmlocal.plan.minimum import minimums

    vm = psutil.virtual_memory()
    checks: list[Check] = []

    def add(c: Check) -> None:
        checks.append(c)
        if on_check:
            on_check(c)

    info = run_child(_child_argv("info"), 120)
    gpus, notes = _gpus(info, int(vm.total))
    choice = choose_build()
    add(backend_check(info, gpus, choice))
    add(gpu_check(gpus, notes))
    models = minimums()
    add(ram_check(int(vm.total), int(vm.available), sum(g.total for g in gpus if not g.unified), models))
    add(disk_check(store.home(), models))
    if smoke:
        add(smoke_check(choice=choice))
    return checks
