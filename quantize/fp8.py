"""FP8 checkpoints as they declare themselves: config.json's `quantization_config` read, every tensor checked
against it before a byte is written, and rows dequantized as llama.cpp's converter does it.

Schemes read (llama.cpp's convert_hf_to_gguf handles the same ones: conversion/base.py, `dequant_model`):
- `quant_method: "fp8"` (DeepSeek-V3 style; also Qwen3 FP8 and others): an F8_E4M3 `weight` and its
  `weight_scale_inv`, one scale per `weight_block_size` [rows, cols] tile; without a block size, one scale per
  tensor or per output row. The scale is multiplied in, whatever its name says.
- `quant_method: "compressed-tensors"`, `format: "float-quantized"`, one config group of 8-bit float weights
  (zai-org's FP8 releases, llm-compressor's FP8 and FP8_BLOCK schemes): `weight_scale` per output channel
  ([out, 1]), per tensor ([1]) or per `block_structure` [rows, cols] tile (`strategy` channel / tensor / block).
Scales are F32, BF16 or F16. Modules the config keeps unquantized (`ignore`, `modules_to_not_convert`) must be
stored unquantized.

Every layout is a tiling of the weight: a tile's scale covers `rows` x `cols` elements, tiles at the bottom and
right edges are cut short (a per-channel scale is a 1 x in tile, a per-tensor one a single out x in tile). The
product is taken in F32; rounding to BF16 is the caller's, once.

Anything else is a SchemeError naming the tensor (or the config key) and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from quantize.errors import ConversionError

FP8_DTYPE = "F8_E4M3"
SCALE_DTYPES = ("F32", "BF16", "F16")
# The scale tensors llama.cpp's converter folds into their weights and drops (fp8: `weight_scale_inv`,
# compressed-tensors: `weight_scale`). A static activation scale (`input_scale`) is not one: it refuses those.
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
STRATEGIES = ("channel", "tensor", "block")
_CONFIG_HINT = "glmlocal converts BF16 checkpoints and FP8 ones: quant_method fp8 or compressed-tensors float-quantized"
_TENSOR_HINT = "the tensors do not match config.json's quantization_config; re-download the checkpoint"


class SchemeError(ConversionError):
    """The checkpoint's quantization scheme, or one tensor under it, is not one the converter reads."""

    def __init__(self, message: str, hint: str = _TENSOR_HINT):
        super().__init__(message, hint=hint)


def _config_error(message: str) -> SchemeError:
    return SchemeError(f"config.json quantization_config: {message}", hint=_CONFIG_HINT)


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint's FP8 weights are scaled, as its config.json says.

    `strategy`: "block" (tiles of `block` [rows, cols]), "channel", "tensor", or "channel-or-tensor" (quant_method
    fp8 without weight_block_size, where each scale's shape says which)."""

    method: str  # "fp8" | "compressed-tensors"
    strategy: str
    block: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()

    @property
    def scale_suffix(self) -> str:
        return "weight_scale_inv" if self.method == "fp8" else "weight_scale"

    def describe(self) -> str:
        how = {"block": f"{self.block[0]}x{self.block[1]} tiles" if self.block else "tiles",
               "channel": "one scale per output channel", "tensor": "one scale per tensor",
               "channel-or-tensor": "one scale per output row or per tensor"}[self.strategy]
        return f"{self.method}, {how}"


@dataclass(frozen=True)
class Tiling:
    """How one FP8 weight's scale tensor covers it: one scale per `rows` x `cols` tile."""

    scale: str  # the scale tensor's name
    rows: int
    cols: int

    def scale_grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(tile rows, tile columns) over a weight of `shape`: the scale seen as a 2-D array."""
        return -(-shape[0] // self.rows), -(-shape[1] // self.cols)


# ------------------------------------------------------------------------------------------- the config

def read_scheme(config: Mapping) -> Fp8Scheme | None:
    """The FP8 scheme config.json declares; None for an unquantized checkpoint. Raises SchemeError otherwise."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _config_error(f"is {type(qc).__name__}, expected an object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_scheme(qc)
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc)
    raise _config_error(f"quant_method {method!r} is not supported, expected 'fp8' or 'compressed-tensors'")


def _fp8_scheme(qc: dict) -> Fp8Scheme:
    if (fmt := qc.get("fmt", "e4m3")) != "e4m3":
        raise _config_error(f"fmt {fmt!r}, expected 'e4m3' (float8_e4m3fn weights)")
    ignore = _names(qc.get("modules_to_not_convert"), "modules_to_not_convert")
    size = qc.get("weight_block_size")
    if size is None:
        return Fp8Scheme("fp8", "channel-or-tensor", None, ignore)
    return Fp8Scheme("fp8", "block", _block(size, "weight_block_size"), ignore)


def _compressed_tensors_scheme(qc: dict) -> Fp8Scheme:
    if (fmt := qc.get("format")) != "float-quantized":
        raise _config_error(f"compressed-tensors format {fmt!r} is not supported, expected 'float-quantized' (FP8)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        n = len(groups) if isinstance(groups, dict) else 0
        raise _config_error(f"{n} compressed-tensors config_groups, expected exactly one")
    (group_name, group), = groups.items()
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        raise _config_error(f"config_groups.{group_name}.weights is missing, expected the weights' scheme")
    where = f"config_groups.{group_name}.weights"
    for key, want in (("type", "float"), ("num_bits", 8)):
        if w.get(key) != want:
            raise _config_error(f"{where}.{key} is {w.get(key)!r}, expected {want!r} (FP8)")
    if w.get("symmetric") is False:
        raise _config_error(f"{where}.symmetric is false, expected symmetric FP8 (no zero points)")
    strategy = w.get("strategy")
    if strategy not in STRATEGIES:
        raise _config_error(f"{where}.strategy {strategy!r} is not supported, expected one of {', '.join(STRATEGIES)}")
    block = _block(w.get("block_structure"), f"{where}.block_structure") if strategy == "block" else None
    return Fp8Scheme("compressed-tensors", strategy, block, _names(qc.get("ignore"), "ignore"))


def _block(value, key: str) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise _config_error(f"{key} is {value!r}, expected [rows, cols] of positive integers")
    return int(value[0]), int(value[1])


def _names(value, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _config_error(f"{key} is {value!r}, expected a list of module names")
    return tuple(value)


def is_ignored(module: str, ignore: tuple[str, ...]) -> bool:
    """Whether an ignore entry names `module`: its exact name, or "re:" and a pattern matching it (as
    compressed-tensors matches them)."""
    return any(re.match(e[3:], module) if e.startswith("re:") else e == module for e in ignore)


# ------------------------------------------------------------------------------------------- the tensors

def check_tensors(scheme: Fp8Scheme | None, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, Tiling]:
    """Every F8_E4M3 weight's tiling, from {name: (dtype, shape)} of the whole checkpoint.

    Raises SchemeError on the first tensor (in the order given) that does not fit the scheme: an FP8 tensor
    without a scheme, outside a 2-D weight, named by the ignore list, without its scale, or with a scale of
    another dtype or shape; a scale whose weight is missing or not FP8; a static activation scale."""
    tilings = {name: _tiling(scheme, name, shape, tensors)
               for name, (dtype, shape) in tensors.items() if dtype == FP8_DTYPE}
    for name in tensors:
        if name.endswith(".input_scale"):
            raise SchemeError(f"tensor {name} is a static activation scale, expected none: FP8 weights with "
                              "dynamic activation scales only (as llama.cpp's converter reads them)")
        suffix = next((s for s in SCALE_SUFFIXES if name.endswith("." + s)), None)
        if suffix is None:
            continue
        weight = name[: -len(suffix)] + "weight"
        if scheme is not None and suffix != scheme.scale_suffix:
            raise SchemeError(f"tensor {name} is a {suffix}, expected {scheme.scale_suffix} scales "
                              f"({scheme.describe()})")
        if weight not in tilings:
            found = f"stored as {tensors[weight][0]}" if weight in tensors else "missing"
            raise SchemeError(f"tensor {name} scales {weight}, which is {found}; expected an {FP8_DTYPE} weight")
    return tilings


def _tiling(scheme: Fp8Scheme | None, name: str, shape: tuple[int, ...],
            tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> Tiling:
    if scheme is None:
        raise SchemeError(f"tensor {name} is {FP8_DTYPE} but config.json has no quantization_config, expected "
                          "one that says how its scales apply")
    if len(shape) != 2 or not name.endswith(".weight"):
        raise SchemeError(f"tensor {name} is {FP8_DTYPE} with shape {list(shape)}, expected only 2-D .weight "
                          "tensors in FP8")
    module = name[: -len(".weight")]
    if is_ignored(module, scheme.ignore):
        raise SchemeError(f"tensor {name} is {FP8_DTYPE} but quantization_config keeps {module} unquantized, "
                          "expected BF16")
    scale = name[: -len("weight")] + scheme.scale_suffix
    if scale not in tensors:
        raise SchemeError(f"tensor {name} is {FP8_DTYPE} without {scale}, expected one ({scheme.describe()})")
    sdtype, sshape = tensors[scale]
    if sdtype not in SCALE_DTYPES:
        raise SchemeError(f"tensor {scale} is {sdtype}, expected {', '.join(SCALE_DTYPES)}")
    tiling, expected = _fit(scheme, scale, (shape[0], shape[1]), tuple(sshape))
    if tiling is None:
        raise SchemeError(f"tensor {scale} has shape {list(sshape)}, expected {expected} for its {list(shape)} "
                          f"weight ({scheme.describe()})")
    return tiling


def _fit(scheme: Fp8Scheme, scale: str, shape: tuple[int, int],
         sshape: tuple[int, ...]) -> tuple[Tiling | None, str]:
    """(the tiling a scale of `sshape` gives a weight of `shape` under the scheme, or None; what was expected)."""
    out, inp = shape
    options: list[tuple[Tiling, tuple[tuple[int, ...], ...]]] = []
    if scheme.strategy == "block":
        tiling = Tiling(scale, *scheme.block)
        options.append((tiling, (tiling.scale_grid(shape),)))
    if scheme.strategy in ("channel", "channel-or-tensor"):
        options.append((Tiling(scale, 1, inp), ((out, 1), (out,))))
    if scheme.strategy in ("tensor", "channel-or-tensor"):
        options.append((Tiling(scale, out, inp), ((1,), (), (1, 1))))
    for tiling, shapes in options:
        if sshape in shapes:
            return tiling, ""
    return None, " or ".join(str(list(shapes[0])) for _, shapes in options)


# ------------------------------------------------------------------------------------------- the values

def _fp8_table() -> np.ndarray:
    """float8_e4m3fn value for every byte (bias 7, no infinities, 0x7f/0xff are NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


_FP8 = _fp8_table()


def fp8_e4m3_to_f32(q: np.ndarray) -> np.ndarray:
    return _FP8[q]


def dequantize_rows(q: np.ndarray, scale: np.ndarray, tiling: Tiling, r0: int) -> np.ndarray:
    """Rows r0.. of an FP8 weight (uint8, (n, in)) times their scales, in F32 (not yet rounded to BF16).

    `scale` is the whole scale tensor as F32 in its 2-D grid (Tiling.scale_grid). Each element is multiplied by
    its own tile's scale once, so the F32 products equal llama.cpp's (the scale repeated over each tile, cut at
    the edges, times the weight) for any r0, and any rows [r0, r0 + n) of the tensor."""
    x = fp8_e4m3_to_f32(q)
    n, inp = x.shape
    per_row = scale[np.arange(r0, r0 + n) // tiling.rows]  # (n, tile columns)
    cols = tiling.cols
    full = inp // cols  # whole tiles across a row; what is left is the cut-short edge tile
    if full:
        tiles = x[:, : full * cols].reshape(n, full, cols)  # a view: splits the last axis only
        np.multiply(tiles, per_row[:, :full, None], out=tiles)
    if full * cols < inp:
        edge = x[:, full * cols:]
        np.multiply(edge, per_row[:, full:full + 1], out=edge)
    return x
