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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glmlocal.doctor.build import (
    CUDA_CMAKE_ARGS,
    cpu_cmake_args,
    cpu_flags,
    rebuild_command,
    unsupported_features,
)

GIB = 1024**3
MIN_FREE_DISK = 20 * GIB  # below this even Air's smallest quant cannot be pulled


@dataclass
class Check:
    """One doctor finding. status: "ok" | "warn" | "fail". fix: what to run, when something is wrong."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    data: dict = field(default_factory=dict)


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


def smoke_check(timeout: float = 300.0, argv_factory: Callable[[str], list[str]] | None = None) -> Check:
    """The end-to-end test: a tiny random Q4_K_M model evaluated by the installed llama.cpp, in a child."""
    with tempfile.TemporaryDirectory(prefix="glmlocal-doctor-") as tmp:
        argv = argv_factory(tmp) if argv_factory else _child_argv("smoke", tmp)
        res = run_child(argv, timeout)
    fix_cpu = rebuild_command(cpu_cmake_args())
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


def backend_check(info: ChildResult, gpus: list) -> Check:
    """Which ggml backends the build has, against the GPUs the machine has."""
    if info.signal_name or info.result is None:
        return Check("llama.cpp build", "fail",
                     f"could not load llama-cpp-python ({info.signal_name or _tail(info.output, 2)})",
                     fix=rebuild_command(f"{CUDA_CMAKE_ARGS} {cpu_cmake_args()}" if gpus else cpu_cmake_args()))
    backends = info.result["backends"]
    names = ", ".join(backends)
    missing = unsupported_features(info.result.get("system_info", ""), cpu_flags())
    if missing:
        return Check("llama.cpp build", "fail",
                     f"llama-cpp-python was compiled for {', '.join(missing)}, which this CPU does not have: "
                     "it will crash (SIGILL) on quantized models", fix=rebuild_command(cpu_cmake_args()),
                     data=info.result)
    gpu_backends = [b for b in backends if b.upper() not in ("CPU", "BLAS", "RPC")]
    if gpus and not gpu_backends:
        return Check("llama.cpp build", "fail",
                     f"llama-cpp-python was built with backends [{names}] only, but this machine has "
                     f"{len(gpus)} NVIDIA GPU(s): nothing will be offloaded",
                     fix=rebuild_command(f"{CUDA_CMAKE_ARGS} {cpu_cmake_args()}"), data=info.result)
    sysinfo = info.result.get("system_info", "").replace("CPU :", "")
    kernels = [p.split("=")[0].strip() for p in sysinfo.split("|") if p.strip().endswith("= 1")]
    return Check("llama.cpp build", "ok", f"backends: {names}; CPU kernels: {' '.join(kernels) or 'baseline'}",
                 data=info.result)


def gpu_check(gpus: list, notes: Sequence[str]) -> Check:
    if not gpus:
        extra = f" ({'; '.join(notes)})" if notes else ""
        return Check("GPUs", "warn", f"no NVIDIA GPU visible: models run on the CPU{extra}")
    desc = "; ".join(f"GPU{g.index} {g.name}: {g.free / GIB:.1f} of {g.total / GIB:.1f} GiB free" for g in gpus)
    busy = [g for g in gpus if g.total and g.free < 0.5 * g.total]
    if busy:
        return Check("GPUs", "warn", desc + " (less than half free: other processes hold VRAM)",
                     fix="close other GPU programs (see nvidia-smi) before loading a model")
    return Check("GPUs", "ok", desc)


SMALLEST_MODEL = 72 * 10**9  # GLM-4.5-Air Q4_K_M weights (~68 GB) plus a small KV cache


def ram_check(total: int, available: int, vram: int = 0) -> Check:
    """RAM, judged together with VRAM against the smallest GLM-4.x model."""
    detail = f"{available / GIB:.1f} of {total / GIB:.1f} GiB available"
    if total + vram < SMALLEST_MODEL:
        return Check("RAM", "warn", detail + f" (+ {vram / GIB:.0f} GiB VRAM): the smallest GLM-4.x model "
                     "(GLM-4.5-Air Q4_K_M, ~68 GB) needs about 72 GB of RAM + VRAM",
                     fix="run `glmlocal plan glm-4.5-air` to see what fits")
    return Check("RAM", "ok", detail)


def disk_check(root: Path) -> Check:
    from glmlocal.models.store import free_bytes

    free = free_bytes(root)
    detail = f"{free / GIB:.1f} GiB free at {root}"
    if free < MIN_FREE_DISK:
        return Check("disk", "warn", detail + ": too little for any GLM-4.x model (the smallest is ~68 GB)",
                     fix="free space or set GLMLOCAL_HOME to a larger disk")
    return Check("disk", "ok", detail)


def run_checks(*, smoke: bool = True, on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """All checks in order; on_check is called as each one completes (the CLI renders them live)."""
    import psutil

    from glmlocal.models import store
    from glmlocal.plan import hardware

    gpus, notes = hardware.probe_gpus()
    vm = psutil.virtual_memory()
    checks: list[Check] = []

    def add(c: Check) -> None:
        checks.append(c)
        if on_check:
            on_check(c)

    add(backend_check(run_child(_child_argv("info"), 120), gpus))
    add(gpu_check(gpus, notes))
    add(ram_check(int(vm.total), int(vm.available), sum(g.total for g in gpus)))
    add(disk_check(store.home()))
    if smoke:
        add(smoke_check())
    return checks
