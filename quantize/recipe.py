"""Per-tensor ggml type choice, exactly as llama.cpp's `llama_model_quantize` picks it.

Pure functions mirroring src/llama-quant.cpp (llama.cpp 0c1e570, vendored in llama-cpp-python 0.3.36):
`tensor_allows_quantization`, `tensor_get_category`, `llama_tensor_get_type_impl` (the subset reachable
for the BF16 / Q8_0 / Q6_K / Q4_K_M ftypes and a non-Falcon arch) and `tensor_type_fallback`.
The input tensor type is what llama.cpp's converter writes (see `source_type`), so a direct conversion
gets the same types as convert_hf_to_gguf.py followed by llama-quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import LlamaFileType

from quantize.ggml import BLOCK_SIZES, GGMLType

# llama_ftype values (include/llama.h, gguf-py's LlamaFileType) and their default tensor type.
FTYPES: dict[str, tuple[int, GGMLType]] = {
    "bf16": (LlamaFileType.MOSTLY_BF16, GGMLType.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLType.Q8_0),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, GGMLType.Q6_K),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, GGMLType.Q4_K),
}

# tensor_type_fallback: 256-block types -> 32-block types when ne0 % 256 != 0.
_FALLBACK = {
    GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0,
    GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0,
}

# Categories in tensor_get_category's matching order (first match wins).
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


@dataclass(frozen=True)
class RecipeContext:
    """Model-wide counters llama.cpp's quantize_state_impl holds.

    n_layer_all: GGUF block_count (trunk + NextN layers: the MTP block counts for use_more_bits).
    n_attention_wv: number of attn_v-like tensors in the file. has_output: False means tied embeddings.
    """

    n_layer_all: int
    n_expert: int
    n_attention_wv: int
    has_output: bool = True


def category(name: str) -> str:
    """llama.cpp's tensor_get_category for a GGUF tensor name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return "other"


def allows_quantization(name: str, n_dims: int) -> bool:
    """tensor_allows_quantization, restricted to names a glm4moe GGUF can contain."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    return "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def source_type(name: str, n_dims: int, outtype: GGMLType = GGMLType.BF16) -> GGMLType:
    """Type convert_hf_to_gguf.py writes (conversion/base.py prepare_tensors): 1-D, norms, the router
    and non-`.weight` tensors are F32, everything else the outtype."""
    if n_dims <= 1 or name.endswith("_norm.weight") or "ffn_gate_inp.weight" in name:
        return GGMLType.F32
    if not name.endswith(".weight"):
        return GGMLType.F32
    return outtype


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits lambda (C integer division; i - n/8 is never negative where used... but
    C's % truncates toward zero, so mirror it for negative operands too)."""
    a = i_layer - n_layers // 8
    c_mod = a - 3 * int(a / 3)
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or c_mod == 2


def layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.") as used by llama.cpp's layer_info for MoE models."""
    if not name.startswith("blk."):
        raise ValueError(f"Failed to determine layer for tensor {name}")
    return int(name.split(".")[1])


def _mixture_type(name: str, ne0: int, new_type: GGMLType, ftype: str, ctx: RecipeContext,
                  i_attention_wv: int) -> GGMLType:
    """llama_tensor_get_type_impl for the Q8_0 / Q6_K / Q4_K_M ftypes on a non-Falcon, non-70B arch.

    The `n_expert == 8` bumps are Mixtral rules; they fire for the 8-expert test fixtures, never for
    the real GLM models (128 / 160 experts).
    """
    cat = category(name)
    if cat == "output" or (not ctx.has_output and cat == "token_embd"):
        if ne0 % BLOCK_SIZES[new_type][0] != 0:
            return GGMLType.Q8_0
        return new_type if new_type == GGMLType.Q8_0 else GGMLType.Q6_K
    if cat in ATTN_V_LIKE:  # attn_qkv is handled here too; the later ATTENTION_QKV branch is unreachable
        if ftype == "q4_k_m" and use_more_bits(i_attention_wv, ctx.n_attention_wv):
            new_type = GGMLType.Q6_K
        return GGMLType.Q8_0 if ctx.n_expert == 8 else new_type
    if cat == "attn_k":
        return GGMLType.Q8_0 if ctx.n_expert == 8 else new_type
    if cat == "ffn_down":
        i_layer = layer_of(name) if ctx.n_expert > 1 else None
        if i_layer is None:
            raise ValueError("dense models are not supported by this recipe")
        if not 0 <= i_layer < ctx.n_layer_all:
            raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {ctx.n_layer_all})")
        if ftype == "q4_k_m" and use_more_bits(i_layer, ctx.n_layer_all):
            return GGMLType.Q6_K
        return new_type
    if cat == "attn_output" and ctx.n_expert == 8 and ftype == "q4_k_m":
        return GGMLType.Q5_K
    return new_type


def fallback(ne0: int, target: GGMLType) -> GGMLType:
    """tensor_type_fallback: if the row length is not a multiple of the block, demote the type."""
    blck = BLOCK_SIZES[target][0]
    if ne0 % blck == 0:
        return target
    ret = _FALLBACK.get(target, target if blck <= 32 else None)
    if ret is None:
        raise ValueError(f"no tensor type fallback is defined for type {target.name}")
    if ne0 % BLOCK_SIZES[ret][0] != 0:
        return GGMLType.F16
    return ret


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, ctx: RecipeContext,
                i_attention_wv: int = 0) -> GGMLType:
    """ggml type of one GGUF tensor (ggml shape order) in a file of `ftype`.

    i_attention_wv: how many attn_v-like tensors precede this one in llama.cpp's visiting order
    (sorted by block then name), which for GLM equals the layer index.
    """
    if ftype not in FTYPES:
        raise ValueError(f"unknown quant {ftype!r}; expected one of {sorted(FTYPES)}")
    src = source_type(name, len(shape))
    if ftype == "bf16":
        return src
    if not allows_quantization(name, len(shape)):
        return src
    default = FTYPES[ftype][1]
    new_type = _mixture_type(name, shape[0], default, ftype, ctx, i_attention_wv)
    return fallback(shape[0], new_type)


def plan_types(tensors: list[tuple[str, tuple[int, ...]]], ftype: str, n_layer_all: int,
               n_expert: int) -> dict[str, GGMLType]:
    """Types for every tensor of a file, visiting in llama.cpp's order to get i_attention_wv right."""
    names = {n for n, _ in tensors}
    ctx = RecipeContext(n_layer_all=n_layer_all, n_expert=n_expert,
                        n_attention_wv=sum(category(n) in ATTN_V_LIKE for n in names),
                        has_output="output.weight" in names)
    out: dict[str, GGMLType] = {}
    i_wv = 0
    for name, shape in sorted(tensors, key=lambda t: weight_order_key(t[0])):
        out[name] = tensor_type(name, shape, ftype, ctx, i_wv)
        if category(name) in ATTN_V_LIKE and allows_quantization(name, len(shape)):
            i_wv += 1
    return out


def weight_order_key(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: block number (-1 for non-block tensors), then name."""
    if name.startswith("blk."):
        try:
            return int(name.split(".")[1]), name
        except ValueError:
            pass
    return -1, name
