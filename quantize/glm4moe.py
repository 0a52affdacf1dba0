"""Everything GLM-4.x specific: HF -> GGUF tensor names, tensor plan (with expert merging and NextN/MTP
handling), GGUF metadata and tokenizer export, all as llama.cpp's convert_hf_to_gguf.py writes them for
`Glm4MoeForCausalLM` (conversion/glm.py `Glm4MoeModel`, conversion/base.py, gguf-py metadata/vocab).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_VERSION, ExpertGatingFuncType
from gguf import GGUFValueType as VT

from quantize.errors import ConversionError, InputError
from quantize.fp8 import SCALE_SUFFIXES

ARCH = "glm4moe"
HF_ARCHS = ("Glm4MoeForCausalLM",)
SIGMOID = ExpertGatingFuncType.SIGMOID
QUANT_VERSION = GGML_QUANT_VERSION

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

# sqrtsoftplus is llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRTSOFTPLUS, newer than gguf-py 0.19.0's enum
_SCORE_FUNCS = {"sigmoid": SIGMOID, "softmax": ExpertGatingFuncType.SOFTMAX, "sqrtsoftplus": 4}
_HPARAMS = (("context_length", ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                "max_sequence_length", "model_max_length")),
            ("embedding_length", ("hidden_size", "n_embd", "dim")),
            ("feed_forward_length", ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                     "intermediate_size", "n_inner", "hidden_dim")),
            ("attention.head_count", ("num_attention_heads", "n_head", "n_heads")),
            ("attention.head_count_kv", ("num_key_value_heads", "n_kv_heads")))
_EPS = (("attention.layer_norm_rms_epsilon", ("rms_norm_eps", "norm_eps")),
        ("attention.layer_norm_epsilon", ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")),
        ("expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
        ("expert_used_count", ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")))
_SCORE_KEYS = ("score_function", "scoring_func", "score_func", "moe_router_activation",
               "moe_router_activation_func", "expert_selection_fn")


def _find(h: dict, keys: tuple[str, ...]) -> Any:
    """TextModel.find_hparam(optional=True): the value of the first key present."""
    return next((h[k] for k in keys if k in h), None)


def rope_parameters(h: dict) -> dict:
    """TextModel.__init__'s rope_parameters: rope_parameters or rope_scaling, with the global RoPE
    settings mirrored into it (the dict every rope key below is read from)."""
    rp = dict(h.get("rope_parameters", h.get("rope_scaling")) or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp
    if (local := _find(h, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                           "rope_local_base_freq"))) is not None:
        rp["sliding_attention"] = {"rope_theta": local}
    for key, value in (("rope_theta", _find(h, ("global_rope_theta", "rope_global_theta", "rope_theta_global",
                                                 "rope_theta", "rotary_emb_base"))),
                       ("rope_type", rp.get("type")),
                       ("partial_rotary_factor", _find(h, ("partial_rotary_factor", "rope_pct", "rope_percent"))),
                       ("original_max_position_embeddings", h.get("original_max_position_embeddings"))):
        if key not in rp and value is not None:
            rp[key] = value
    return rp


def rope_kv(rp: dict) -> list[tuple[str, VT, Any]]:
    """RoPE scaling, sections and bases as TextModel.set_gguf_parameters writes them. GLM-4.x configs
    have `rope_scaling: null` (nothing written); a linear or YaRN entry added by a user is exported the way
    llama.cpp's converter does, and llama.cpp applies it at load time."""
    a, params = ARCH, rp.get("full_attention", rp)
    kv: list[tuple[str, VT, Any]] = []
    rope_type, factor = params.get("rope_type"), params.get("factor")
    if rope_type in ("linear", "yarn") and factor is not None:
        kv += [(f"{a}.rope.scaling.type", VT.STRING, rope_type), (f"{a}.rope.scaling.factor", VT.FLOAT32, factor)]
        if rope_type == "yarn":
            if "original_max_position_embeddings" not in params:
                raise ConversionError("config.json has YaRN rope scaling without original_max_position_embeddings")
            kv.append((f"{a}.rope.scaling.original_context_length", VT.UINT32,
                       params["original_max_position_embeddings"]))
            for key, value in (("yarn_ext_factor", params.get("extrapolation_factor")),
                               ("yarn_attn_factor", params.get("attention_factor", params.get("attn_factor"))),
                               ("yarn_beta_fast", params.get("beta_fast")),
                               ("yarn_beta_slow", params.get("beta_slow"))):
                if value is not None:
                    kv.append((f"{a}.rope.scaling.{key}", VT.FLOAT32, value))
    elif rope_type in ("su", "longrope"):
        kv.append((f"{a}.rope.scaling.type", VT.STRING, "longrope"))
    if "mrope_section" in rp:
        sections = (list(rp["mrope_section"]) + [0, 0, 0, 0])[:4]
        kv.append((f"{a}.rope.dimension_sections", VT.ARRAY, (VT.INT32, sections)))
    if (theta := params.get("rope_theta")) is not None:
        kv.append((f"{a}.rope.freq_base", VT.FLOAT32, theta))
    if (swa := rp.get("sliding_attention", {}).get("rope_theta")) is not None:
        kv.append((f"{a}.rope.freq_base_swa", VT.FLOAT32, swa))
    return kv


def hparams_kv(cfg: GLMConfig, mtp: bool, file_type: int) -> list[tuple[str, VT, Any]]:
    """glm4moe.* hyperparameters in the order TextModel + Glm4MoeModel.set_gguf_parameters write them
    (a key written twice keeps its first position, as in gguf-py)."""
    h, a = cfg.raw, ARCH
    rp = rope_parameters(h)
    kv: list[tuple[str, VT, Any]] = [(f"{a}.block_count", VT.UINT32, cfg.n_layer + (cfg.n_nextn if mtp else 0))]
    kv += [(f"{a}.{key}", VT.UINT32, v) for key, names in _HPARAMS if (v := _find(h, names)) is not None]
    if h.get("is_causal") is False:
        kv.append((f"{a}.attention.causal", VT.BOOL, False))
    kv += rope_kv(rp)
    kv += [(f"{a}.{key}", VT.FLOAT32 if "eps" in key else VT.UINT32, v)
           for key, names in _EPS if (v := _find(h, names)) is not None]
    if h.get("n_group") is not None:
        kv.append((f"{a}.expert_group_count", VT.UINT32, h["n_group"]))
    if h.get("topk_group") is not None:
        kv.append((f"{a}.expert_group_used_count", VT.UINT32, h["topk_group"]))
    if (score := _find(h, _SCORE_KEYS)) is not None:
        if score not in _SCORE_FUNCS:
            raise ConversionError(f"unsupported expert scoring function {score!r} in config.json")
        kv.append((f"{a}.expert_gating_func", VT.UINT32, _SCORE_FUNCS[score]))
    if h.get("head_dim") is not None:
        kv += [(f"{a}.attention.key_length", VT.UINT32, h["head_dim"]),
               (f"{a}.attention.value_length", VT.UINT32, h["head_dim"])]
    kv.append(("general.file_type", VT.UINT32, file_type))
    return kv + _glm_kv(cfg, rp, mtp)


def _glm_kv(cfg: GLMConfig, rp: dict, mtp: bool) -> list[tuple[str, VT, Any]]:
    """Glm4MoeModel.set_gguf_parameters' own keys, then the quantization version."""
    h, a = cfg.raw, ARCH
    head_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    kv: list[tuple[str, VT, Any]] = [
        (f"{a}.rope.dimension_count", VT.UINT32, int(head_dim * rp.get("partial_rotary_factor", 0.5)))]
    for key, name in (("expert_count", "n_routed_experts"), ("expert_feed_forward_length", "moe_intermediate_size"),
                      ("expert_shared_count", "n_shared_experts"),
                      ("leading_dense_block_count", "first_k_dense_replace")):
        if h.get(name) is not None:
            kv.append((f"{a}.{key}", VT.UINT32, h[name]))
    kv.append((f"{a}.expert_gating_func", VT.UINT32, SIGMOID))
    if h.get("routed_scaling_factor") is not None:
        kv.append((f"{a}.expert_weights_scale", VT.FLOAT32, h["routed_scaling_factor"]))
    if h.get("norm_topk_prob") is not None:
        kv.append((f"{a}.expert_weights_norm", VT.BOOL, h["norm_topk_prob"]))
    if mtp and h.get("num_nextn_predict_layers") is not None:
        kv.append((f"{a}.nextn_predict_layers", VT.UINT32, h["num_nextn_predict_layers"]))
    kv.append(("general.quantization_version", VT.UINT32, QUANT_VERSION))
    return kv
