"""Everything GLM-4.x specific: HF -> GGUF tensor names, tensor plan (with expert merging and NextN/MTP
handling), GGUF metadata and tokenizer export, all as llama.cpp's convert_hf_to_gguf.py writes them for
`Glm4MoeForCausalLM` (conversion/glm.py `Glm4MoeModel`, conversion/base.py, gguf-py metadata/vocab).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmlocal.errors import ConversionError, InputError
from quantize.gguf_reader import GGUFValueType as VT

ARCH = "glm4moe"
HF_ARCHS = ("Glm4MoeForCausalLM",)
SIGMOID = 2  # ExpertGatingFuncType.SIGMOID
QUANT_VERSION = 2  # GGML_QNT_VERSION
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "eh_proj.weight": "nextn.eh_proj.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
    "embed_tokens.weight": "nextn.embed_tokens.weight",
}
_GLOBAL_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


class WrongArchitectureError(InputError):
    def __init__(self, path: Path, found: Any):
        super().__init__(f"{path} is {found}, not a GLM-4.5/4.6/4.7 MoE checkpoint (Glm4MoeForCausalLM)",
                         hint="glmlocal converts only GLM-4.x MoE models")
        self.found = found


class UnknownTensorError(ConversionError):
    def __init__(self, name: str):
        super().__init__(f"unknown tensor {name} in checkpoint (not part of a GLM-4.x MoE model)")
        self.name = name


@dataclass(frozen=True)
class GLMConfig:
    """The config.json fields the converter needs."""

    raw: dict
    n_layer: int  # trunk layers
    n_nextn: int
    n_expert: int

    @classmethod
    def load(cls, src_dir: Path) -> "GLMConfig":
        path = src_dir / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise InputError(f"no config.json in {src_dir}", hint="pass a Hugging Face checkpoint directory") from e
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from e
        archs = raw.get("architectures") or []
        if not any(a in HF_ARCHS for a in archs):
            raise WrongArchitectureError(src_dir, archs or raw.get("model_type"))
        try:
            return cls(raw, int(raw["num_hidden_layers"]), int(raw.get("num_nextn_predict_layers", 0)),
                       int(raw["n_routed_experts"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} lacks a valid {e} field") from e


@dataclass
class PlannedTensor:
    """One GGUF tensor: its ggml shape, and the HF tensors (one, or one per expert) it is made from."""

    name: str
    shape: tuple[int, ...]
    sources: list[str]
    layer: int | None


def map_name(hf_name: str) -> tuple[str, int | None, tuple[int, str] | None]:
    """HF name -> (GGUF name, layer, (expert, which) for routed experts). Raises UnknownTensorError."""
    name = hf_name.replace("language_model.", "")
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name], None, None
    m = _LAYER_RE.match(name)
    if not m:
        raise UnknownTensorError(hf_name)
    bid, rest = int(m.group(1)), m.group(2)
    if em := _EXPERT_RE.match(rest):
        return f"blk.{bid}.ffn_{em.group(2)}_exps.weight", bid, (int(em.group(1)), em.group(2))
    if rest not in _LAYER_MAP:
        raise UnknownTensorError(hf_name)
    return f"blk.{bid}.{_LAYER_MAP[rest]}", bid, None


def plan_tensors(order: list[str], shapes: dict[str, tuple[int, ...]], cfg: GLMConfig,
                 mtp: bool) -> list[PlannedTensor]:
    """GGUF tensors in convert_hf_to_gguf.py's output order: HF tensors in visiting order, each layer's
    experts merged (down, gate, up) at the position of the layer's last expert tensor."""
    out: list[PlannedTensor] = []
    pending: dict[int, dict[tuple[int, str], str]] = {}
    for hf in order:
        if hf.endswith(SCALE_SUFFIXES):
            continue
        gname, bid, expert = map_name(hf)
        if bid is not None and bid >= cfg.n_layer + cfg.n_nextn:
            raise UnknownTensorError(hf)
        if bid is not None and bid >= cfg.n_layer and not mtp:
            continue
        if expert is None:
            out.append(PlannedTensor(gname, tuple(reversed(shapes[hf])), [hf], bid))
            continue
        layer = pending.setdefault(bid, {})
        layer[expert] = hf
        if len(layer) == cfg.n_expert * 3:
            out.extend(_merge_experts(bid, layer, shapes, cfg.n_expert))
            del pending[bid]
    if pending:
        left = sorted(v for d in pending.values() for v in d.values())
        raise ConversionError(f"incomplete experts in checkpoint, e.g. {left[0]} ({len(left)} unmerged)")
    return out


def _merge_experts(bid: int, layer: dict, shapes: dict, n_expert: int) -> list[PlannedTensor]:
    merged = []
    for w in ("down", "gate", "up"):
        srcs = []
        for e in range(n_expert):
            if (e, w) not in layer:
                raise ConversionError(f"layer {bid} lacks expert {e} {w}_proj")
            srcs.append(layer[(e, w)])
        shape2 = shapes[srcs[0]]
        if any(shapes[s] != shape2 for s in srcs):
            raise ConversionError(f"layer {bid} experts have different {w}_proj shapes")
        merged.append(PlannedTensor(f"blk.{bid}.ffn_{w}_exps.weight", (shape2[1], shape2[0], n_expert), srcs, bid))
    return merged


# ---------------------------------------------------------------------------------------------- metadata

def _id_to_title(s: str) -> str:
    """gguf-py Metadata.id_to_title: the fallback model name from the directory name."""
    words = s.strip().replace("-", " ").split()
    return " ".join(w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w) else w for w in words)


def _rounded(n: float) -> str:
    """gguf-py utility.model_weight_count_rounded_notation(min_digits=2)."""
    for limit, scale, suffix in ((1e12, 1e-12, "T"), (1e9, 1e-9, "B"), (1e6, 1e-6, "M")):
        if n > limit:
            break
    else:
        scale, suffix = 1e-3, "K"
    x = n * scale
    fix = max(2 - len(str(round(x)).lstrip("0")), 0)
    return f"{x:.{fix}f}{suffix}"


def size_label(tensors: list[PlannedTensor]) -> str:
    """gguf-py size_label over the written tensors (experts count per-expert)."""
    shared = expert = expert_sum = n_exp_tensors = 0
    for t in tensors:
        size = math.prod(t.shape)
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[-1]  # ggml order: experts last
            expert += size // count
            expert_sum += count
            n_exp_tensors += 1
        else:
            shared += size
    count = expert_sum // n_exp_tensors if n_exp_tensors else 0
    return f"{count}x{_rounded(shared + expert)}" if count else _rounded(shared + expert)


_SAMPLING = (("sequence", "sequence", VT.STRING), ("top_k", "top_k", VT.INT32), ("top_p", "top_p", VT.FLOAT32),
             ("min_p", "min_p", VT.FLOAT32), ("xtc_probability", "xtc_probability", VT.FLOAT32),
             ("xtc_threshold", "xtc_threshold", VT.FLOAT32), ("temperature", "temp", VT.FLOAT32),
             ("penalty_last_n", "penalty_last_n", VT.INT32), ("repetition_penalty", "penalty_repeat", VT.FLOAT32),
             ("mirostat", "mirostat", VT.INT32), ("mirostat_tau", "mirostat_tau", VT.FLOAT32),
             ("mirostat_eta", "mirostat_eta", VT.FLOAT32))


def general_kv(src_dir: Path, tensors: list[PlannedTensor]) -> list[tuple[str, VT, Any]]:
    """general.* keys in gguf-py's order (architecture, type, sampling, name, size_label)."""
    kv: list[tuple[str, VT, Any]] = [("general.architecture", VT.STRING, ARCH), ("general.type", VT.STRING, "model")]
    gen_path = src_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    for src_key, key, vt in _SAMPLING:
        if src_key == "repetition_penalty":
            value = gen.get("penalty_repeat", gen.get("repetition_penalty"))
        else:
            value = gen.get(src_key)
        if value is not None:
            kv.append((f"general.sampling.{key}", vt, value))
    kv.append(("general.name", VT.STRING, _id_to_title(Path(os.path.abspath(src_dir)).name)))
    kv.append(("general.size_label", VT.STRING, size_label(tensors)))
    return kv


def hparams_kv(cfg: GLMConfig, mtp: bool, file_type: int) -> list[tuple[str, VT, Any]]:
    """glm4moe.* hyperparameters in the order TextModel + Glm4MoeModel.set_gguf_parameters write them."""
    h = cfg.raw
    a = ARCH
    kv: list[tuple[str, VT, Any]] = [(f"{a}.block_count", VT.UINT32, cfg.n_layer + (cfg.n_nextn if mtp else 0))]
    for key, names in (("context_length", ("max_position_embeddings",)), ("embedding_length", ("hidden_size",)),
                       ("feed_forward_length", ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                                "intermediate_size")),
                       ("attention.head_count", ("num_attention_heads",)),
                       ("attention.head_count_kv", ("num_key_value_heads",))):
        if (v := next((h[n] for n in names if n in h), None)) is not None:
            kv.append((f"{a}.{key}", VT.UINT32, v))
    rope = h.get("rope_parameters") or {**(h.get("rope_scaling") or {}), "rope_theta": h.get("rope_theta")}
    if rope.get("rope_type") not in (None, "default"):
        raise ConversionError(f"unsupported rope scaling {rope.get('rope_type')!r} for GLM-4.x conversion")
    if rope.get("rope_theta") is not None:
        kv.append((f"{a}.rope.freq_base", VT.FLOAT32, rope["rope_theta"]))
    kv.append((f"{a}.attention.layer_norm_rms_epsilon", VT.FLOAT32, h["rms_norm_eps"]))
    kv.append((f"{a}.expert_count", VT.UINT32, h["n_routed_experts"]))
    kv.append((f"{a}.expert_used_count", VT.UINT32, h["num_experts_per_tok"]))
    if h.get("n_group") is not None:
        kv.append((f"{a}.expert_group_count", VT.UINT32, h["n_group"]))
    if h.get("topk_group") is not None:
        kv.append((f"{a}.expert_group_used_count", VT.UINT32, h["topk_group"]))
    if h.get("scoring_func") == "sigmoid":
        kv.append((f"{a}.expert_gating_func", VT.UINT32, SIGMOID))
    if h.get("head_dim") is not None:
        kv += [(f"{a}.attention.key_length", VT.UINT32, h["head_dim"]),
               (f"{a}.attention.value_length", VT.UINT32, h["head_dim"])]
    kv.append(("general.file_type", VT.UINT32, file_type))
    head_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    kv.append((f"{a}.rope.dimension_count", VT.UINT32, int(head_dim * rope.get("partial_rotary_factor",
                                                                                h.get("partial_rotary_factor", 0.5)))))
    kv.append((f"{a}.expert_feed_forward_length", VT.UINT32, h["moe_intermediate_size"]))
    if h.get("n_shared_experts") is not None:
        kv.append((f"{a}.expert_shared_count", VT.UINT32, h["n_shared_experts"]))
    if h.get("first_k_dense_replace") is not None:
        kv.append((f"{a}.leading_dense_block_count", VT.UINT32, h["first_k_dense_replace"]))
    kv.append((f"{a}.expert_gating_func", VT.UINT32, SIGMOID))
    if h.get("routed_scaling_factor") is not None:
        kv.append((f"{a}.expert_weights_scale", VT.FLOAT32, h["routed_scaling_factor"]))
    if h.get("norm_topk_prob") is not None:
        kv.append((f"{a}.expert_weights_norm", VT.BOOL, h["norm_topk_prob"]))
    if mtp and cfg.n_nextn:
        kv.append((f"{a}.nextn_predict_layers", VT.UINT32, cfg.n_nextn))
    kv.append(("general.quantization_version", VT.UINT32, QUANT_VERSION))
    return kv
