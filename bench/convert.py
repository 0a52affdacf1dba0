"""Benchmark: one-pass Q4_K_M conversion vs the two-step pipeline (BF16 GGUF, then llama_model_quantize).

Builds (or reuses from the test cache) the ~1 GB "bench1g" fixture checkpoint, then runs, in fresh
processes on the same machine and in the same run:
  one-pass  quantize.convert(src, out, "q4_k_m")
  two-step  quantize.convert(src, bf16, "bf16") then llama_cpp.llama_model_quantize(bf16 -> q4_k_m)
and prints wall time, peak RSS (max over the step processes) and peak extra disk (sampled), and the
wall-time ratio one-pass / two-step. Targets: ratio <= 0.8, one-pass peak RSS < 1 GiB.

    python bench/convert.py [--preset bench1g] [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEP = r"""
import ctypes, json, resource, sys, time
kind, src, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.monotonic()
if kind == "quantize":
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = 15, threads
    assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p)) == 0
else:
    from quantize.convert import convert
    convert(src, out, quant=kind, threads=threads)
# VmHWM is this process's own peak RSS (ru_maxrss would include the parent's RSS at fork: Linux keeps it
# across execve).
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.monotonic() - t, "rss": hwm, "cpu": ru.ru_utime + ru.ru_stime}))
"""


class DiskSampler:
    """Peak total size of the files in a directory, sampled every 50 ms."""

    def __init__(self, d: Path):
        self.d, self.peak, self._stop = d, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            size = 0
            for f in self.d.iterdir():
                try:
                    size += f.stat().st_blocks * 512
                except FileNotFoundError:
                    pass
            self.peak = max(self.peak, size)
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def step(kind: str, src: Path, out: Path, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP, kind, str(src), str(out), str(threads)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_pass(src: Path, work: Path, threads: int) -> dict:
    with DiskSampler(work) as disk:
        r = step("q4_k_m", src, work / "one.gguf", threads)
    size = (work / "one.gguf").stat().st_size
    (work / "one.gguf").unlink()
    return {"wall": r["wall"], "cpu": r["cpu"], "rss": r["rss"], "disk": disk.peak, "size": size}


def two_step(src: Path, work: Path, threads: int) -> dict:
    with DiskSampler(work) as disk:
        a = step("bf16", src, work / "bf16.gguf", threads)
        b = step("quantize", work / "bf16.gguf", work / "two.gguf", threads)
    for f in ("bf16.gguf", "two.gguf"):
        (work / f).unlink()
    return {"wall": a["wall"] + b["wall"], "cpu": a["cpu"] + b["cpu"], "rss": max(a["rss"], b["rss"]),
            "disk": disk.peak,
            "bf16_wall": a["wall"], "quantize_wall": b["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench1g")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs of each pipeline; best is reported")
    args = ap.parse_args()
    from tests.conftest import build_cached_checkpoint

    src = build_cached_checkpoint(args.preset)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    ones, twos = [], []
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        work = Path(tmp)
        for _ in range(args.repeat):  # interleaved, so load from other jobs hits both pipelines alike
            twos.append(two_step(src, work, args.threads))
            ones.append(one_pass(src, work, args.threads))
    one, two = min(ones, key=lambda r: r["wall"]), min(twos, key=lambda r: r["wall"])
    mib = 2**20
    print(f"checkpoint {args.preset}: {src_bytes / mib:.0f} MiB safetensors, threads={args.threads}, "
          f"best of {args.repeat}")
    print(f"one-pass Q4_K_M : {one['wall']:6.1f} s wall {one['cpu']:6.1f} s CPU  peak RSS {one['rss'] / mib:5.0f} MiB"
          f"  peak extra disk {one['disk'] / mib:5.0f} MiB (output {one['size'] / mib:.0f} MiB)")
    print(f"two-step        : {two['wall']:6.1f} s wall {two['cpu']:6.1f} s CPU  peak RSS {two['rss'] / mib:5.0f} MiB"
          f"  peak extra disk {two['disk'] / mib:5.0f} MiB (bf16 {two['bf16_wall']:.1f} s + quantize "
          f"{two['quantize_wall']:.1f} s)")
    print("all runs (s): one-pass " + ", ".join(f"{r['wall']:.1f}" for r in ones)
          + "; two-step " + ", ".join(f"{r['wall']:.1f}" for r in twos))
    print(f"ratio one-pass / two-step: wall {one['wall'] / two['wall']:.2f} (target <= 0.80), "
          f"CPU {one['cpu'] / two['cpu']:.2f}")


if __name__ == "__main__":
    main()
