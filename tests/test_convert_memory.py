"""Peak memory of a streamed conversion does not grow with model size.

Bound (see quantize/convert.py): the converter holds the encoded bytes of the slabs queued ahead of the
write (at most 48 MiB of F32 rows: whole experts, or row blocks of a large tensor) and one row chunk per
worker thread (a few MiB in all) -- well under 128 MiB -- on top of the interpreter and the GGUF header
(~10 MB for GLM's 151k-token vocabulary). The test converts the tiny (~15 MB) and bench1g
(~1 GB) fixtures in fresh processes and requires their peak RSS to differ by less than 128 MiB while the
checkpoint grows about 70x.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GROWTH_BOUND = 128 * 2**20

MEASURE = """
import json, resource, sys
from quantize.convert import convert
r = convert(sys.argv[1], sys.argv[2], quant=sys.argv[3])
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's RSS, kept across execve)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss": hwm, "bytes": r.bytes_written}))
"""


def peak_rss(src: Path, out: Path, quant: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out), quant], capture_output=True,
                          text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out.unlink()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpoint_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


@pytest.mark.slow
def test_peak_rss_independent_of_model_size(ckpt_factory, tmp_path):
    small, large = ckpt_factory("tiny"), ckpt_factory("bench1g")
    assert checkpoint_bytes(large) > 50 * checkpoint_bytes(small)
    a = peak_rss(small, tmp_path / "a.gguf", "q4_k_m")
    b = peak_rss(large, tmp_path / "b.gguf", "q4_k_m")
    assert b["bytes"] > 50 * a["bytes"]
    assert b["peak_rss"] - a["peak_rss"] < GROWTH_BOUND, (a, b)
    assert b["peak_rss"] < 1024 * 2**20, b  # the absolute target for a ~1 GB model
