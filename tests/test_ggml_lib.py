"""One ggml per process: the converter's quantizer (quantize.ggml) and llama.cpp use the same libggml-base.

The wheel ships `libggml-base.so` and `libggml-base.so.0` as two copies of one file; libllama links the
`.so.0`. Opening the other copy by path loads a second, independent ggml (its own globals), and which one
a process ends up with depended on import order. Each order runs in a fresh interpreter, which loads a
model with llama.cpp and quantizes with our binding, then reports what is mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import ctypes, json, os, sys

import numpy as np

def quantizer():
    from quantize import ggml
    with ggml.Quantizer(threads=1) as q:
        q.quantize(ggml.GGMLType.Q8_0, np.ones((4, 64), dtype=np.float32))
    return ggml

def model(path):
    from glmlocal.engine.engine import Engine
    from glmlocal.plan.planner import Placement
    eng = Engine.load(path, Placement.cpu_only(ctx=256, threads=1))
    eng.close()

order, path = sys.argv[1], sys.argv[2]
if order == "quantizer-first":
    ggml = quantizer()
    model(path)
else:
    model(path)
    ggml = quantizer()

import llama_cpp.llama_cpp as C

def addr(fn):
    return ctypes.cast(fn, ctypes.c_void_p).value

mapped = {}
for line in open("/proc/self/maps"):
    parts = line.split()
    if len(parts) >= 6 and os.path.basename(parts[5]).startswith("libggml-base.so"):
        mapped.setdefault(parts[5], set()).add(parts[4])  # path -> inodes
print(json.dumps({
    "mapped": {p: sorted(i) for p, i in mapped.items()},
    "ours": addr(ggml._lib().ggml_quantize_chunk),
    "llama": addr(C._lib.ggml_quantize_chunk),  # resolved through libllama's own dependencies
    "lib_path": str(ggml.lib_path()),
}))
"""


@pytest.fixture(scope="module")
def gguf(gguf_factory):
    return gguf_factory("tiny", "q8_0")


@pytest.mark.parametrize("order", ["quantizer-first", "model-first"])
def test_quantizer_and_llama_cpp_share_one_libggml_base(gguf, order):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, order, str(gguf)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen["mapped"]) == 1, f"two libggml-base files mapped: {seen['mapped']}"
    assert Path(next(iter(seen["mapped"]))).name == "libggml-base.so.0"
    assert Path(seen["lib_path"]).name == "libggml-base.so.0"
    assert seen["ours"] == seen["llama"], "the quantizer calls a different ggml_quantize_chunk than llama.cpp's"
