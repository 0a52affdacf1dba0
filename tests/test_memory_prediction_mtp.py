"""MTP's predicted memory vs what llama.cpp allocates: the NextN block loaded (load_mtp), the main context running
with the NextN hidden rows of every token (embeddings_nextn, unmasked), and the MTP context (graph_mtp, the KV of
one layer), on fixture GGUFs on the CPU, through the engine's own parameter functions.

Each buffer is read from llama.cpp's log (glmlocal.llama.log's router); the compute buffers from the teardown line
("compute buffer size is X MiB, matches expectation" or "of X MiB, does not match"), which reports the size after
the decodes, so a graph that needed more than the reserve would show. Both contexts decode a full ubatch first.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager

import pytest

from glmlocal.plan.footprint import (
    compute_buffer_bytes,
    footprint_from_gguf,
    mtp_compute_buffer_bytes,
)
from glmlocal.plan.hardware import GIB, Hardware
from glmlocal.plan.mtp import own_head
from glmlocal.plan.planner import plan

C = pytest.importorskip("llama_cpp.llama_cpp")
E = pytest.importorskip("llama_cpp.llama_cpp_ext")

MiB = 2**20
_SIZE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
_TEARDOWN = re.compile(r"(\S+)\s+compute buffer size (?:is|of)\s+([\d.]+) MiB")
CPU = Hardware(gpus=(), ram_total=16 * GIB, ram_available=16 * GIB, cores=2, cpu_bandwidth=20e9)


def sizes(lines: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in _SIZE.finditer("\n".join(lines)):
        key = f"{m.group(1)} {m.group(2)}"
        out[key] = out.get(key, 0.0) + float(m.group(3)) * MiB
    for m in _TEARDOWN.finditer("\n".join(lines)):
        out[f"{m.group(1)} compute after"] = float(m.group(2)) * MiB
    return out


@contextmanager
def logged():
    from glmlocal.llama.log import router

    with router().capture() as lines:
        yield lines


def close(predicted: float, measured: float, rel: float = 0.005) -> bool:
    return abs(predicted - measured) <= rel * measured + 0.006 * MiB  # the log prints 0.01 MiB


def decode_full(ctx, n: int, n_embd: int = 0) -> None:
    """One decode of n tokens of sequence 0 at positions 0..n-1, logits for the last; with n_embd, each entry
    also carries an n_embd row (the trunk's hidden state an MTP context pairs with its token)."""
    b = C.llama_batch_init(n, 0, 1)
    rows = (ctypes.c_float * (n * n_embd))(*([0.01] * (n * n_embd))) if n_embd else None
    try:
        b.n_tokens = n
        for i in range(n):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = (i * 7) % 1000, i, 1, i == n - 1
            b.seq_id[i][0] = 0
        if rows is not None:
            b.embd = ctypes.cast(rows, ctypes.POINTER(ctypes.c_float))
        assert C.llama_decode(ctx, b) == 0
    finally:
        b.embd = None  # ours, not llama_batch_init's: llama_batch_free must not free it
        C.llama_batch_free(b)


def load_with_mtp(path, p, n_seq: int) -> dict[str, dict[str, float]]:
    """Model (load_mtp), main context (+ a full-ubatch decode with NextN rows on) and MTP context (+ a full
    ubatch of pairs), each phase's log parsed on its own."""
    from glmlocal.engine.params import context_params, model_params, mtp_context_params

    keep: list[object] = []
    C.llama_backend_init()
    out = {}
    with logged() as lines:
        model = C.llama_model_load_from_file(str(path).encode(), model_params(p, keep, None, None))
    out["model"] = sizes(lines)
    assert model
    try:
        with logged() as lines:
            main = C.llama_init_from_model(model, context_params(p, p.n_ctx, n_seq))
            E.llama_set_embeddings_nextn(main, True, False)
            decode_full(main, p.n_ubatch)
            C.llama_free(main)
        out["main"] = sizes(lines)
        with logged() as lines:
            mtp = C.llama_init_from_model(model, mtp_context_params(p, p.n_ctx, n_seq))
            assert mtp
            E.llama_set_embeddings_nextn(mtp, True, False)
            decode_full(mtp, p.n_ubatch, C.llama_model_n_embd(model))
            C.llama_free(mtp)
        out["mtp"] = sizes(lines)
    finally:
        C.llama_model_free(model)
    return out


# (preset, n_ctx, n_ubatch, n_seq, KV type): GLM-4.6 and GLM-4.5 NextN layouts (the latter with its own head and
# embedding), the 4-layer mid fixture, two sequences, a q8_0 cache (Hadamard rotations), a ubatch above n_ctx/2.
CONFIGS = [("tiny", 1024, 512, 1, "f16"), ("tiny45", 2048, 256, 2, "f16"), ("mid", 4096, 512, 1, "q8_0"),
           ("tiny45", 512, 512, 1, "f16")]


@pytest.mark.parametrize("preset,n_ctx,n_ubatch,n_seq,kv", CONFIGS)
def test_mtp_buffers_match_llama_cpp(gguf_factory, preset, n_ctx, n_ubatch, n_seq, kv):
    path = gguf_factory(preset, "q4_k_m")
    fp = footprint_from_gguf(path)
    p = plan(fp, CPU, ctx=n_ctx, kv_type=kv, n_ubatch=n_ubatch, mtp=True, n_seq=n_seq)
    assert p.mtp and p.n_ctx == n_ctx and p.n_ubatch == n_ubatch
    (cpu,) = p.devices
    got = load_with_mtp(path, p, n_seq)
    # Weights: the trunk the plan counts plus the whole NextN block (its own head and embedding in tiny45).
    assert close(cpu.weights + fp.mtp_weights_bytes, got["model"]["CPU_Mapped model"])
    assert own_head(fp) == (fp.mtp_layer.nextn_embd > 0) == (preset == "tiny45")
    # Main context: trunk KV only (the NextN layer is filtered out), compute as reserved and after the decode.
    assert close(cpu.kv, got["main"]["CPU KV"])
    main_compute = compute_buffer_bytes(fp, n_ctx, n_ubatch, type_k=kv, n_seq=n_seq, h_all=True)
    assert close(main_compute, got["main"]["CPU compute after"])
    assert close(cpu.compute, got["main"]["CPU compute"] + got["main"]["CPU output"], 0.02)
    # MTP context: one layer of KV at the cache type, graph_mtp's buffer with n_seq rows of logits.
    kv_layer = fp.kv_bytes_per_token_layer(kv, kv) * n_ctx
    assert close(kv_layer, got["mtp"]["CPU KV"])
    mtp_compute = mtp_compute_buffer_bytes(fp, n_ctx, n_ubatch, n_seq=n_seq, type_k=kv, type_v=kv)
    assert close(mtp_compute, got["mtp"]["CPU compute"]) and close(mtp_compute, got["mtp"]["CPU compute after"])
    # The plan's MTP share holds all of that (plus RAM-side hand-over buffers, an upper bound).
    assert cpu.mtp >= fp.mtp_weights_bytes + kv_layer + mtp_compute


def test_logits_rows_are_what_n_outputs_max_saves(gguf_factory):
    """Without n_outputs_max the MTP context would reserve logits for every token of a ubatch: on tiny at 512
    tokens that is 7.50 MiB instead of 4.51 MiB (llama.cpp's own numbers for the two settings)."""
    fp = footprint_from_gguf(gguf_factory("tiny", "q4_k_m"))
    assert mtp_compute_buffer_bytes(fp, 1024, 512, n_seq=1) == pytest.approx(4.5117 * MiB, abs=0.0001 * MiB)
    assert mtp_compute_buffer_bytes(fp, 1024, 512, n_seq=512) == pytest.approx(7.5 * MiB, abs=0.0001 * MiB)
