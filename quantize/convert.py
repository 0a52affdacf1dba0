"""GLM-4.x safetensors checkpoint -> GGUF (BF16, Q8_0, Q6_K, Q4_K_M) in one streamed pass.

Plan every tensor (name, shape, type) from the shard headers, write the GGUF header, then stream each
tensor in bounded slabs (whole experts, or at most SLAB_BYTES of F32 rows) into the writer. Worker threads
(one per core) read, decode and quantize row chunks of several slabs at once with ggml's quantizer, while
the calling thread writes finished slabs in order; the output appears under its final name only when
complete.

Memory bound, independent of model size: the slabs queued ahead of the write, at most
IN_FLIGHT_BYTES + SLAB_BYTES (48 MiB) of F32 rows, whose encoded bytes are held (at most 48 MiB, for F32
outputs; a seventh of that for Q4_K), plus one chunk per worker (raw rows and their F32 decode, at most
1.5 x CHUNK_BYTES; about 6 MiB over all workers up to 64 threads, since chunks shrink as threads grow;
FP8 decoding adds a few temporaries of chunk size), on top of the interpreter and the GGUF header (~10 MB for GLM's 151k-token vocabulary).
See tests/test_convert_memory.py.

Layout choices, so files are byte-identical to llama.cpp's own tools:
- BF16: tensor and key order of convert_hf_to_gguf.py.
- quantized: what `llama-quantize` makes from that BF16 file: tensors sorted by (block, name), and
  general.quantization_version / general.file_type moved to the end of the KV section.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFValueType as VT

from quantize import fp8, glm4moe, metadata, recipe, vocab
from quantize.errors import DiskSpaceError, InputError
from quantize.ggml import (
    MIN_CHUNK_ELEMENTS,
    GGMLType,
    is_quantized,
    prepare,
    quantize_into,
    row_size,
)
from quantize.safetensors_io import (
    SUPPORTED,
    Checkpoint,
    UnsupportedDtypeError,
    bf16_bits_to_f32,
)
from quantize.writer import GGUFWriter

QUANTS = tuple(recipe.FTYPES)
SLAB_BYTES = 16 * 2**20  # F32 bytes per streamed slab (bounds peak memory; see tests/test_convert_memory.py)
IN_FLIGHT_BYTES = 2 * SLAB_BYTES  # F32 bytes of slabs queued ahead of the one being written
MAX_IN_FLIGHT = 256  # slabs queued ahead (bounds the bookkeeping for runs of tiny tensors)
CHUNK_BYTES = 2 * 2**20  # largest F32 rows per worker task (bounds per-thread buffers)


@dataclass(frozen=True)
class ConvertProgress:
    """Progress event: output bytes written so far, of total; rate and ETA from the data phase."""

    bytes_done: int
    bytes_total: int
    tensor: str
    elapsed_s: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_done / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.bytes_done <= 0:
            return None
        return self.elapsed_s * (self.bytes_total - self.bytes_done) / self.bytes_done


@dataclass
class ConvertResult:
    path: Path
    quant: str
    n_tensors: int
    bytes_written: int
    seconds: float
    type_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Job:
    planned: glm4moe.PlannedTensor
    ggml_type: GGMLType


def plan(src_dir: Path, quant: str, mtp: bool = True, out_path: Path | None = None,
         source_name: str | None = None) -> tuple[Checkpoint, GGUFWriter, list[_Job]]:
    """Validate the checkpoint and build a writer with all metadata and tensor infos declared.

    Reads headers only, so it doubles as a dry run: `writer.total_bytes` is the exact output size. Every check
    happens here, before the output is opened: an FP8 scheme the converter does not read, or an FP8 tensor that
    does not fit the one config.json declares, fails now, not hours into the write. `source_name`: see `convert`."""
    if quant not in QUANTS:
        raise InputError(f"unknown quant {quant!r}", hint=f"choose one of {', '.join(QUANTS)}")
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise InputError(f"{src_dir} is not a directory", hint="pass a checkpoint directory")
    cfg = glm4moe.GLMConfig.load(src_dir)
    ckpt = Checkpoint(src_dir, fp8.read_scheme(cfg.raw))
    shapes = {n: e.shape for n, e in ckpt.entries.items()}
    planned = glm4moe.plan_tensors(ckpt.file_order(), shapes, cfg, mtp)
    for t in planned:
        for s in t.sources:
            if ckpt.entries[s].dtype not in SUPPORTED:
                raise UnsupportedDtypeError(s, ckpt.entries[s].dtype)
    ftype, _ = recipe.FTYPES[quant]
    if quant == "bf16":
        types = {t.name: recipe.source_type(t.name, len(t.shape)) for t in planned}
    else:
        n_layer_all = cfg.n_layer + (cfg.n_nextn if mtp else 0)
        types = recipe.plan_types([(t.name, t.shape) for t in planned], quant, n_layer_all, cfg.n_expert)
        planned = sorted(planned, key=lambda t: recipe.weight_order_key(t.name))
    writer = GGUFWriter(out_path or src_dir / f"model-{quant}.gguf")
    _add_kv(writer, src_dir, cfg, planned, mtp, ftype, quant != "bf16", source_name)
    jobs = []
    for t in planned:
        writer.add_tensor_info(t.name, t.shape, types[t.name])
        jobs.append(_Job(t, types[t.name]))
    return ckpt, writer, jobs


def _add_kv(w: GGUFWriter, src: Path, cfg, planned, mtp: bool, ftype: int, quantized: bool,
            source_name: str | None) -> None:
    bf16_kv = (metadata.general_kv(src, planned, glm4moe.ARCH, source_name)
               + glm4moe.hparams_kv(cfg, mtp, recipe.FTYPES["bf16"][0]) + vocab.tokenizer_kv(src, cfg.raw))
    for key, vt, value in bf16_kv:
        if vt == VT.ARRAY:
            w.add_array(key, *value)
        else:
            w.add_kv(key, vt, value)
    if quantized:
        # llama_model_quantize: gguf_set_val_u32 removes then appends these two keys
        w.remove_kv("general.quantization_version")
        w.remove_kv("general.file_type")
        w.add_u32("general.quantization_version", glm4moe.QUANT_VERSION)
        w.add_u32("general.file_type", ftype)


def convert(src_dir: str | Path, out_path: str | Path, quant: str = "q4_k_m", threads: int | None = None,
            mtp: bool = True, progress: Callable[[ConvertProgress], None] | None = None,
            source_name: str | None = None) -> ConvertResult:
    """Convert a GLM-4.x MoE safetensors checkpoint (BF16 or FP8) to GGUF. See module docstring.

    general.name / basename / version come from the checkpoint directory's name, as in llama.cpp's
    converter; `source_name` names it instead (e.g. the repository name "GLM-4.6"). By default a Hugging
    Face cache snapshot (`models--org--name/snapshots/<commit>`) is named after its repository."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise InputError(f"unknown quant {quant!r}", hint=f"choose one of {', '.join(QUANTS)}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    t0 = time.monotonic()
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"output {out} is a directory", hint="give a file name ending in .gguf")
    ckpt, writer, jobs = plan(Path(src_dir), quant, mtp, out, source_name)
    total = writer.total_bytes
    try:
        writer.open()  # creates <out>.part: a clear "not writable" error comes before space checks
        _preflight(out, total)
        start = time.monotonic()

        def on_write(name: str) -> None:
            if progress:
                progress(ConvertProgress(writer.bytes_written, total, name, time.monotonic() - start))

        _stream(ckpt, jobs, writer, threads or os.cpu_count() or 1, on_write)
        path = writer.finish()
    except BaseException:
        writer.abort()
        raise
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.ggml_type.name] = counts.get(j.ggml_type.name, 0) + 1
    return ConvertResult(path, quant, len(jobs), path.stat().st_size, time.monotonic() - t0, counts)


def _preflight(out: Path, total: int) -> None:
    """Refuse up front when the output file system cannot hold the whole file."""
    free = shutil.disk_usage(out.parent).free
    if free < total:
        raise DiskSpaceError(str(out), total, free)


def _slabs(ckpt: Checkpoint, jobs: list[_Job]):
    """(job, [(source tensor, first row, end row), ...]) for every bounded piece, in output order.

    A piece holds at most SLAB_BYTES of F32: several whole experts of a merged expert tensor, or a row
    block of one large 2-D tensor, starting at a multiple of the FP8 tile height when the tensor is FP8 (so a
    piece covers whole rows of its scale grid, whatever the checkpoint's block)."""
    for job in jobs:
        ncols = job.planned.shape[0]
        align = max(ckpt.row_align(s) for s in job.planned.sources)  # one value: experts share a layout
        step = max(align, SLAB_BYTES // (ncols * 4) // align * align)
        group: list[tuple[str, int, int]] = []
        rows = 0
        for src in job.planned.sources:
            n_rows = ckpt.n_rows(src)
            if group and rows + n_rows > step:
                yield job, group
                group, rows = [], 0
            if n_rows <= step:
                group.append((src, 0, n_rows))
                rows += n_rows
                continue
            for r0 in range(0, n_rows, step):
                yield job, [(src, r0, min(n_rows, r0 + step))]
        if group:
            yield job, group


@dataclass
class _Slab:
    """One slab in flight: its encoded bytes, filled by chunk tasks on the worker pool."""

    job: _Job
    out: np.ndarray
    f32_bytes: int
    futures: list = field(default_factory=list)


class _Encoder:
    """Read, decode and encode slabs on a pool of `threads` workers, in chunks of whole rows.

    Each task reads its rows straight from the shard (positioned read), decodes BF16 into a reused
    per-thread F32 buffer and quantizes into its place in the slab's output buffer, so decoding and
    quantizing both run on every core and nothing is copied twice. Bytes equal ggml's for any chunking:
    every type here is quantized row by row, without an importance matrix."""

    def __init__(self, ckpt: Checkpoint, threads: int):
        self.ckpt, self.threads = ckpt, threads
        self.pool = ThreadPoolExecutor(threads)
        self._local = threading.local()
        # a few chunks per thread per slab balances load; at least MIN_CHUNK_ELEMENTS as llama.cpp does
        self.chunk_bytes = min(CHUNK_BYTES, max(MIN_CHUNK_ELEMENTS * 4, SLAB_BYTES // (4 * threads)))

    def submit(self, job: _Job, parts: list[tuple[str, int, int]]) -> _Slab:
        gt, ncols = job.ggml_type, job.planned.shape[0]
        if gt not in (GGMLType.F32, GGMLType.BF16):
            prepare(gt)
        n_rows = sum(r1 - r0 for _, r0, r1 in parts)
        rsize = row_size(gt, ncols)
        slab = _Slab(job, np.empty(n_rows * rsize, dtype=np.uint8), n_rows * ncols * 4)
        step = max(1, self.chunk_bytes // (ncols * 4))
        row = 0
        for src, r0, r1 in parts:  # chunks never cross a source tensor (one expert)
            for c0 in range(r0, r1, step):
                c1 = min(r1, c0 + step)
                dst = slab.out[(row + c0 - r0) * rsize:(row + c1 - r0) * rsize]
                slab.futures.append(self.pool.submit(self._chunk, src, c0, c1, gt, ncols, dst))
            row += r1 - r0
        return slab

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's raw BF16 and F32 buffers, grown to n elements (reused across tasks)."""
        loc = self._local
        if getattr(loc, "n", 0) < n:
            loc.raw, loc.f32, loc.n = np.empty(n, np.uint16), np.empty(n, np.float32), n
        return loc.raw[:n], loc.f32[:n]

    def _chunk(self, src: str, r0: int, r1: int, gt: GGMLType, ncols: int, dst: np.ndarray) -> None:
        dtype, n = self.ckpt.entries[src].dtype, (r1 - r0) * ncols
        if dtype == "BF16" and gt == GGMLType.BF16:
            self.ckpt.read_rows_into(src, r0, r1, dst)  # BF16 -> BF16 is a copy
            return
        if dtype == "BF16":
            raw, f32 = self._buffers(n)
            self.ckpt.read_rows_into(src, r0, r1, raw)
            if gt == GGMLType.F32:
                bf16_bits_to_f32(raw, dst.view(np.float32))
                return
            x = bf16_bits_to_f32(raw, f32).reshape(-1, ncols)
        else:  # F16, F32, FP8: the general reader (FP8 is dequantized and rounded to BF16)
            x = self.ckpt.read_rows_f32(src, r0, r1)
        if gt == GGMLType.F32:
            dst.view(np.float32)[:] = x.reshape(-1)
        elif gt == GGMLType.BF16:
            # exact: values are BF16-representable (BF16 sources, or FP8 rounded to BF16); the high
            # halves of the little-endian F32 words are the BF16 bits
            dst.view(np.uint16)[:] = x.reshape(-1).view(np.uint16)[1::2]
        elif gt == GGMLType.F16 or is_quantized(gt):
            quantize_into(gt, np.ascontiguousarray(x, dtype=np.float32), dst)
        else:
            raise ValueError(f"cannot encode to {gt.name}")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _stream(ckpt: Checkpoint, jobs: list[_Job], writer: GGUFWriter, threads: int,
            on_write: Callable[[str], None]) -> None:
    """Encode every slab on the worker pool and write them in order from this thread.

    Slabs are submitted ahead while up to IN_FLIGHT_BYTES of F32 rows are queued, so workers never wait
    for a write or for the slowest chunk of a slab (no barrier between slabs); writes release the GIL and
    overlap with encoding. Memory: the in-flight slabs' encoded bytes plus one chunk per worker."""
    enc = _Encoder(ckpt, threads)
    pending: deque[_Slab] = deque()
    queued = 0
    try:
        for job, parts in _slabs(ckpt, jobs):
            pending.append(enc.submit(job, parts))
            queued += pending[-1].f32_bytes
            while queued > IN_FLIGHT_BYTES or len(pending) > MAX_IN_FLIGHT:
                queued -= _write(pending.popleft(), writer, on_write)
        while pending:
            _write(pending.popleft(), writer, on_write)
    finally:
        enc.close()


def _write(slab: _Slab, writer: GGUFWriter, on_write: Callable[[str], None]) -> int:
    for f in slab.futures:
        f.result()
    writer.write_tensor_data(slab.job.planned.name, slab.out)
    on_write(slab.job.planned.name)
    return slab.f32_bytes
