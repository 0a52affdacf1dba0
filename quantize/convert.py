"""GLM-4.x safetensors checkpoint -> GGUF (BF16, Q8_0, Q6_K, Q4_K_M) in one streamed pass.

Plan every tensor (name, shape, type) from the shard headers, write the GGUF header, then stream each
tensor in bounded slabs (one expert, or at most SLAB_BYTES of F32 rows) through ggml's quantizer into the
writer. Peak memory is O(largest slab), independent of model size; the output appears under its final
name only when complete.

Layout choices, so files are byte-identical to llama.cpp's own tools:
- BF16: tensor and key order of convert_hf_to_gguf.py.
- quantized: what `llama-quantize` makes from that BF16 file: tensors sorted by (block, name), and
  general.quantization_version / general.file_type moved to the end of the KV section.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from glmlocal.errors import DiskSpaceError, InputError
from quantize import glm4moe, recipe, vocab
from quantize.ggml import GGMLType, Quantizer, is_quantized
from quantize.gguf_reader import GGUFValueType as VT
from quantize.safetensors_io import SUPPORTED, Checkpoint, UnsupportedDtypeError
from quantize.writer import GGUFWriter

QUANTS = tuple(recipe.FTYPES)
SLAB_BYTES = 16 * 2**20  # F32 bytes per streamed slab (bounds peak memory; see tests/test_convert_memory.py)


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


def plan(src_dir: Path, quant: str, mtp: bool = True,
         out_path: Path | None = None) -> tuple[Checkpoint, GGUFWriter, list[_Job]]:
    """Validate the checkpoint and build a writer with all metadata and tensor infos declared.

    Reads headers only, so it doubles as a dry run: `writer.total_bytes` is the exact output size."""
    if quant not in QUANTS:
        raise InputError(f"unknown quant {quant!r}", hint=f"choose one of {', '.join(QUANTS)}")
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise InputError(f"{src_dir} is not a directory", hint="pass a checkpoint directory")
    cfg = glm4moe.GLMConfig.load(src_dir)
    ckpt = Checkpoint(src_dir)
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
    _add_kv(writer, src_dir, cfg, planned, mtp, ftype, quantized=quant != "bf16")
    jobs = []
    for t in planned:
        writer.add_tensor_info(t.name, t.shape, types[t.name])
        jobs.append(_Job(t, types[t.name]))
    return ckpt, writer, jobs


def _add_kv(w: GGUFWriter, src: Path, cfg, planned, mtp: bool, ftype: int, quantized: bool) -> None:
    bf16_kv = (glm4moe.general_kv(src, planned) + glm4moe.hparams_kv(cfg, mtp, recipe.FTYPES["bf16"][0])
               + vocab.tokenizer_kv(src, cfg.raw))
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
            mtp: bool = True, progress: Callable[[ConvertProgress], None] | None = None) -> ConvertResult:
    """Convert a GLM-4.x MoE safetensors checkpoint (BF16 or FP8) to GGUF. See module docstring."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise InputError(f"unknown quant {quant!r}", hint=f"choose one of {', '.join(QUANTS)}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    t0 = time.monotonic()
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"output {out} is a directory", hint="give a file name ending in .gguf")
    ckpt, writer, jobs = plan(Path(src_dir), quant, mtp, out)
    total = writer.total_bytes
    with Quantizer(threads or os.cpu_count() or 1) as q:
        try:
            writer.open()  # creates <out>.part: a clear "not writable" error comes before space checks
            _preflight(out, total)
            start = time.monotonic()
            for job, (x, per) in _read_ahead(ckpt, jobs):
                writer.write_tensor_data(job.planned.name, _encode(x, per, job.ggml_type, q))
                if progress:
                    progress(ConvertProgress(writer.bytes_written, total, job.planned.name,
                                             time.monotonic() - start))
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

    A piece holds at most SLAB_BYTES of F32: several whole experts of a merged expert tensor (fewer
    barriers between quantizer calls), or a row block of one large 2-D tensor (row counts are multiples
    of 128, the FP8 scale block)."""
    for job in jobs:
        ncols = job.planned.shape[0]
        step = max(128, SLAB_BYTES // (ncols * 4) // 128 * 128)
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


def _read_slab(ckpt: Checkpoint, parts: list[tuple[str, int, int]]) -> tuple[np.ndarray, int]:
    """F32 rows of a slab and the rows per matrix in it (experts are never split across chunks)."""
    xs = [ckpt.read_rows_f32(*p) for p in parts]
    return (xs[0], len(xs[0])) if len(xs) == 1 else (np.concatenate(xs), len(xs[0]))


def _read_ahead(ckpt: Checkpoint, jobs: list[_Job]):
    """Yield (job, F32 slab) while a helper thread already reads and decodes the next slab, so the
    quantizer threads are not idle during I/O. At most two slabs are alive at once."""
    with ThreadPoolExecutor(1) as pool:
        it = _slabs(ckpt, jobs)
        nxt = next(it, None)
        fut = pool.submit(_read_slab, ckpt, nxt[1]) if nxt else None
        while fut is not None:
            job, x = nxt[0], fut.result()
            nxt = next(it, None)
            fut = pool.submit(_read_slab, ckpt, nxt[1]) if nxt else None
            yield job, x
            del x


def _encode(x: np.ndarray, rows_per_matrix: int, gt: GGMLType, q: Quantizer) -> np.ndarray:
    if gt == GGMLType.F32:
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(-1)
    if gt == GGMLType.BF16:
        # exact: values are already BF16-representable (BF16 sources, or FP8 rounded to BF16)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1)
    if gt == GGMLType.F16 or is_quantized(gt):
        return q.quantize(gt, x, rows_per_matrix)
    raise ValueError(f"cannot encode to {gt.name}")
