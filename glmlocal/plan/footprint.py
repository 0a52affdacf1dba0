"""Memory footprint of a GLM-4 MoE model: bytes per tensor, grouped per layer, plus KV and compute.

Two ways in, one result:
- `footprint_from_gguf(path)` reads only the GGUF header (quantize.gguf_reader): exact bytes;
  `footprint_from_headers` does the same from headers already parsed (a published GGUF's, before download).
- `footprint_from_spec(spec, quant)` enumerates the tensors llama.cpp's converter writes for the
  registry hyperparameters and types them with quantize.recipe (the rules our converter uses, which
  are llama-quantize's), so the prediction before download equals the file we would write.

Pure: no I/O beyond reading the GGUF header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from glmlocal.errors import InputError
from glmlocal.models.registry import HParams, ModelSpec, normalize_quant
from glmlocal.plan.graph import (
    KV_PAD,
    GraphShape,
    reserve_bytes,
    reserve_bytes_split,
)
from quantize.ggml import BLOCK_SIZES, GGMLType, tensor_nbytes
from quantize.gguf_reader import GGUFHeader, read_gguf
from quantize.recipe import plan_types

GROUPS = ("attention", "dense_ffn", "shared_expert", "router", "experts", "nextn", "nextn_embd")
KV_TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "f32")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
STEADY_LAYERS = 4  # MoE layers after which ggml-alloc's state repeats (3 measured; one spare)


@dataclass(frozen=True)
class LayerFootprint:
    """Bytes of one repeating block (`blk.N.*`), split into the groups placement cares about.

    `is_nextn` marks the MTP block: llama.cpp counts it as a layer slot for -ngl but does not
    allocate its tensors unless MTP speculative decoding is on (load_mtp), and it has no KV in the main context.
    `nextn` is its eh_proj, norms and (GLM-4.5 layout) shared head; `nextn_embd` its own token embedding
    (GLM-4.5 layout), kept apart because, like token_embd, it only feeds get_rows and can stay in RAM.
    `expert_tensors` are (name, bytes) of the routed-expert tensors (ffn_*_exps).
    """

    index: int
    attention: int = 0
    dense_ffn: int = 0
    shared_expert: int = 0
    router: int = 0
    experts: int = 0
    nextn: int = 0
    nextn_embd: int = 0
    is_nextn: bool = False
    expert_tensors: tuple[tuple[str, int], ...] = ()

    @property
    def non_expert(self) -> int:
        """What every token touches: attention, dense FFN, shared expert, router (and norms)."""
        return self.attention + self.dense_ffn + self.shared_expert + self.router + self.nextn + self.nextn_embd

    @property
    def total(self) -> int:
        return self.non_expert + self.experts


@dataclass(frozen=True)
class Footprint:
    """A model's memory needs, independent of where it runs."""

    label: str
    quant: str
    n_layer: int  # trunk layers (the main graph loops over these)
    n_nextn: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    layers: tuple[LayerFootprint, ...]
    token_embd: int
    output: int  # output.weight + output_norm
    file_bytes: int  # every tensor in the file, MTP block included
    source: str = "spec"  # "gguf" or "spec"
    tensor_types: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    repack: dict[str, int] = field(default_factory=dict, compare=False, repr=False)  # see repacked()
    # What else shapes the compute graph (defaults: GLM-4.5/4.6's)
    n_ff_dense: int = 0  # dense-layer FFN width (0: n_ff_exp * n_expert_used)
    n_ff_shexp: int = -1  # shared-expert FFN width (-1: n_ff_exp)
    n_dense_lead: int = 1
    attn_bias: bool = True
    qk_norm: bool = False
    expert_norm: bool = True
    expert_scale: float = 2.5

    @property
    def n_layer_all(self) -> int:
        """GGUF block_count: trunk + NextN; the range -ngl counts over (plus one for the output)."""
        return self.n_layer + self.n_nextn

    @property
    def trunk(self) -> tuple[LayerFootprint, ...]:
        return tuple(layer for layer in self.layers if not layer.is_nextn)

    @property
    def weights_bytes(self) -> int:
        """Bytes llama.cpp allocates for weights (the unused MTP block is skipped at load)."""
        return self.token_embd + self.output + sum(layer.total for layer in self.trunk)

    @property
    def expert_bytes(self) -> int:
        return sum(layer.experts for layer in self.trunk)

    @property
    def mtp_layer(self) -> LayerFootprint | None:
        """The NextN (MTP) block, when the file has one with its eh_proj (a trunk-only GGUF keeps the count)."""
        nextn = [layer for layer in self.layers if layer.is_nextn and layer.nextn]
        return nextn[0] if len(nextn) == 1 else None  # llama.cpp's graph_mtp runs exactly one block

    @property
    def mtp_weights_bytes(self) -> int:
        """Bytes load_mtp adds: the whole NextN block (0 without one)."""
        return self.mtp_layer.total if self.mtp_layer else 0

    def kv_bytes_per_token(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """K+V bytes per context token over the trunk layers (the NextN layer has no KV here)."""
        per_layer = kv_row_bytes(type_k, self.n_head_kv * self.head_dim)
        per_layer += kv_row_bytes(type_v, self.n_head_kv * self.head_dim)
        return per_layer * self.n_layer

    def kv_bytes_per_token_layer(self, type_k: str = "f16", type_v: str = "f16") -> int:
        return self.kv_bytes_per_token(type_k, type_v) // max(self.n_layer, 1)


# --------------------------------------------------------------------------------------------
# Compute buffers (what llama.cpp reserves for the worst-case graph)
# --------------------------------------------------------------------------------------------
def compute_buffer_bytes(fp: Footprint, n_ctx: int, n_ubatch: int, *, flash_attn: bool = True,
                         output: bool = True, type_k: str = "f16", type_v: str | None = None,
                         n_layer: int | None = None, n_seq: int = 1, h_all: bool = False) -> int:
    """Bytes of the compute buffer llama.cpp reserves on one backend for the worst-case graph.

    llama.cpp reserves the prompt graph with T = min(n_ubatch, n_ctx) tokens, all of them outputs,
    attending over the whole (256-padded) cache, then the one-token graph, and keeps the larger.
    glmlocal.plan.graph rebuilds that graph and replays ggml-alloc over it, so fragmentation is
    counted exactly. `output=False` drops the output norm and logits (a GPU without the output layer).
    Quantized K/V types add llama.cpp's Hadamard rotation of Q/K/V.

    The layers are identical, so the allocator's free list reaches a fixed point after the dense
    layers plus a few MoE layers and every later layer repeats it: replaying `n_layer` layers
    (default: the dense ones + STEADY_LAYERS) gives the same bytes as all 92 of GLM-4.6, ~20x faster
    (tests/test_memory_prediction.py checks that equality on the registry's shapes).

    `n_seq` sequences (n_seq_max): the token graph has one token each. `h_all`: the context will run with
    llama_set_embeddings_nextn(masked=False) (MTP on), whose graph keeps every row to the output norm; its
    prompt ubatch (one output per sequence) is counted too, as ggml-alloc grows the buffer if it needs more.
    """
    n_kv = -(-n_ctx // KV_PAD) * KV_PAD
    n_layer = min(fp.n_dense_lead + STEADY_LAYERS, fp.n_layer) if n_layer is None else n_layer
    base = _graph_shape_args(fp, n_kv, max(1, min(n_layer, fp.n_layer)), flash_attn=flash_attn, output=output,
                             type_k=type_k, type_v=type_v)
    t = _reserve_tokens(n_ubatch, n_kv, n_seq)
    # prompt graph, then the token graph: the buffer only ever grows
    sizes = [reserve_bytes(GraphShape(n_tokens=t, **base)), reserve_bytes(GraphShape(n_tokens=n_seq, **base))]
    if h_all and output:
        sizes.append(reserve_bytes(GraphShape(n_tokens=t, n_outputs=min(n_seq, t), h_all=True, **base)))
    return max(sizes)


def mtp_compute_buffer_bytes(fp: Footprint, n_ctx: int, n_ubatch: int, *, n_seq: int = 1, flash_attn: bool = True,
                             type_k: str = "f16", type_v: str | None = None) -> int:
    """The compute buffer of an MTP context (ctx_type MTP: llama.cpp's graph_mtp over the NextN block) with
    n_outputs_max = n_seq: its decodes ask logits for at most one entry per sequence (the draft root or step),
    so the reserve counts n_seq rows of logits, not one per token."""
    n_kv = -(-n_ctx // KV_PAD) * KV_PAD
    base = _graph_shape_args(fp, n_kv, 1, flash_attn=flash_attn, output=True, type_k=type_k, type_v=type_v)
    base.update(n_dense_lead=0, mtp=True)  # the NextN block is a MoE layer
    t = _reserve_tokens(n_ubatch, n_kv, n_seq)
    return max(reserve_bytes(GraphShape(n_tokens=t, n_outputs=min(n_seq, t), **base)),
               reserve_bytes(GraphShape(n_tokens=n_seq, **base)))


def _reserve_tokens(n_ubatch: int, n_kv: int, n_seq: int) -> int:
    """The worst-case ubatch llama.cpp reserves: min(n_ubatch, n_ctx) tokens, rounded up to a multiple of n_seq."""
    t = min(n_ubatch, n_kv)
    return -(-t // n_seq) * n_seq


def compute_buffers_split(fp: Footprint, n_ctx: int, n_ubatch: int, devices: tuple, *, flash_attn: bool = True,
                          type_k: str = "f16", type_v: str | None = None) -> tuple[int, ...]:
    """Compute buffer per backend (GPUs in llama.cpp's order, then the CPU) when the weights are spread as
    `devices` says (see compute_graph.GraphShape.devices) over backends without op_offload (RPC, or
    --no-op-offload): ops run where their weights are, so the CPU buffer holds the work of RAM-resident
    experts. Replays ggml-backend's scheduler (splits, input copies) and ggml-alloc over every layer."""
    n_kv = -(-n_ctx // KV_PAD) * KV_PAD
    base = _graph_shape_args(fp, n_kv, fp.n_layer, flash_attn=flash_attn, output=True, type_k=type_k,
                             type_v=type_v)
    base["devices"] = devices
    pp = reserve_bytes_split(GraphShape(n_tokens=min(n_ubatch, n_kv), **base))
    tg = reserve_bytes_split(GraphShape(n_tokens=1, **base))
    return tuple(max(a, b) for a, b in zip(pp, tg))


def _graph_shape_args(fp: Footprint, n_kv: int, n_layer: int, *, flash_attn: bool, output: bool, type_k: str,
                      type_v: str | None) -> dict:
    """GraphShape fields, n_tokens aside, for `n_layer` layers of this model over an `n_kv`-token cache."""
    return {
        "n_layer": n_layer, "n_embd": fp.n_embd, "n_head": fp.n_head, "n_head_kv": fp.n_head_kv,
        "head_dim": fp.head_dim, "n_vocab": fp.n_vocab, "n_expert": fp.n_expert, "n_expert_used": fp.n_expert_used,
        "n_ff_exp": fp.n_ff_exp, "n_ff_dense": fp.n_ff_dense or fp.n_ff_exp * fp.n_expert_used,
        "n_ff_shexp": fp.n_ff_exp if fp.n_ff_shexp < 0 else fp.n_ff_shexp, "n_dense_lead": fp.n_dense_lead,
        "attn_bias": fp.attn_bias, "qk_norm": fp.qk_norm, "expert_norm": fp.expert_norm,
        "expert_scale": fp.expert_scale, "n_kv": n_kv, "flash_attn": flash_attn, "output": output,
        "rot_k": _quantized(type_k), "rot_v": _quantized(type_v or type_k)}


def _quantized(type_name: str) -> bool:
    return type_name.lower() not in ("f16", "bf16", "f32")


def kv_row_bytes(type_name: str, n: int) -> int:
    """Bytes of n cache elements stored as `type_name` (f16, q8_0, q4_0, ...)."""
    try:
        if type_name.lower() not in KV_TYPES:
            raise KeyError(type_name)
        t = GGMLType[type_name.upper()]
    except KeyError:
        raise InputError(f"unknown KV cache type {type_name!r}", hint=f"choose one of: {', '.join(KV_TYPES)}")
    blck, size = BLOCK_SIZES[t]
    if n % blck:
        raise InputError(f"KV cache type {type_name} needs a head size that is a multiple of {blck}")
    return n // blck * size


def classify(name: str) -> tuple[int | None, str]:
    """(layer index or None, group) for a GGUF tensor name of a glm4moe file."""
    m = _BLK.match(name)
    if not m:
        if name.startswith("token_embd"):
            return None, "token_embd"
        return None, "output"  # output.weight, output_norm.weight
    layer, rest = int(m.group(1)), m.group(2)
    if rest.startswith("nextn.embed_tokens"):
        group = "nextn_embd"
    elif rest.startswith("nextn."):
        group = "nextn"
    elif "_exps" in rest:
        group = "experts"
    elif "_shexp" in rest:
        group = "shared_expert"
    elif rest.startswith(("ffn_gate_inp", "exp_probs_b")):
        group = "router"
    elif rest.startswith("ffn_"):
        group = "dense_ffn"
    else:
        group = "attention"  # attn_*, post_attention_norm
    return layer, group


# ggml-cpu's repack.cpp (x86 AVX2 and ARM dot-product kernels): matmul weights of these types with a
# multiple of 8 rows are copied into an interleaved layout, in "CPU_REPACK" buffers, when they live in RAM.
_REPACK_TYPES = {GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.IQ4_NL, GGMLType.MXFP4}


def _repacked(name: str, shape: tuple[int, ...], gtype: int) -> bool:
    if name.startswith("token_embd") or len(shape) not in (2, 3) or shape[1] % 8:
        return False  # the embeddings feed get_rows, which has no repacked kernel
    return GGMLType(gtype) in _REPACK_TYPES


def build_footprint(tensors: Iterable[tuple[str, tuple[int, ...], int]], meta: dict, *, label: str,
                    quant: str, source: str) -> Footprint:
    """Group (name, ggml shape, ggml type) triples into a Footprint; `meta` holds the hyperparameters."""
    per_layer: dict[int, dict[str, int]] = {}
    experts: dict[int, list[tuple[str, int]]] = {}
    token_embd = output = total = 0
    types: dict[str, str] = {}
    repack: dict[str, int] = {}
    for name, shape, gtype in tensors:
        nbytes = tensor_nbytes(gtype, shape)
        types[name] = GGMLType(gtype).name
        if _repacked(name, shape, gtype):
            repack[name] = nbytes
        total += nbytes
        layer, group = classify(name)
        if layer is None:
            token_embd += nbytes if group == "token_embd" else 0
            output += nbytes if group == "output" else 0
            continue
        per_layer.setdefault(layer, dict.fromkeys(GROUPS, 0))[group] += nbytes
        if group == "experts":
            experts.setdefault(layer, []).append((name, nbytes))
    n_layer = meta["n_layer"]
    layers = tuple(
        LayerFootprint(index=i, **per_layer.get(i, dict.fromkeys(GROUPS, 0)), is_nextn=i >= n_layer,
                       expert_tensors=tuple(sorted(experts.get(i, []))))
        for i in range(n_layer + meta["n_nextn"])
    )
    return Footprint(label=label, quant=quant, layers=layers, token_embd=token_embd, output=output,
                     file_bytes=total, source=source, tensor_types=types, repack=repack, **meta)


# --------------------------------------------------------------------------------------------
# From a GGUF header
# --------------------------------------------------------------------------------------------
def _gguf_meta(md: dict, path: PurePath) -> dict:
    arch = md.get("general.architecture")
    if arch != "glm4moe":
        raise InputError(f"{path}: architecture {arch!r} is not glm4moe (GLM-4.5/4.6/4.7)")

    def key(k: str, default=None):
        v = md.get(f"glm4moe.{k}", default)
        if v is None:
            raise InputError(f"{path}: GGUF lacks glm4moe.{k}")
        return v[0] if isinstance(v, list) else v

    n_nextn = int(key("nextn_predict_layers", 0))
    n_head = int(key("attention.head_count"))
    n_embd = int(key("embedding_length"))
    vocab = md.get("tokenizer.ggml.tokens")
    return {
        "n_layer": int(key("block_count")) - n_nextn, "n_nextn": n_nextn, "n_embd": n_embd, "n_head": n_head,
        "n_head_kv": int(key("attention.head_count_kv")),
        "head_dim": int(key("attention.key_length", n_embd // n_head)),
        "n_vocab": int(key("vocab_size", len(vocab) if vocab else 0)),
        "n_ctx_train": int(key("context_length")), "n_expert": int(key("expert_count")),
        "n_expert_used": int(key("expert_used_count")), "n_ff_exp": int(key("expert_feed_forward_length")),
        "n_ff_dense": int(key("feed_forward_length", 0)), "n_dense_lead": int(key("leading_dense_block_count", 0)),
        "n_ff_shexp": int(key("expert_feed_forward_length")) * int(key("expert_shared_count", 0)),
        "expert_norm": bool(key("expert_weights_norm", False)), "expert_scale": float(key("expert_weights_scale", 0.0)),
    }


def _split_paths(path: Path) -> list[Path]:
    """All parts of a split GGUF (`-00001-of-00005.gguf`), or just the file."""
    m = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", path.name)
    if not m:
        return [path]
    n = int(m.group(3))
    return [path.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def footprint_from_gguf(path: str | Path) -> Footprint:
    """Footprint of a GGUF (any split part may be given) from its header alone."""
    path = Path(path)
    return footprint_from_headers([read_gguf(p) for p in _split_paths(path)], path)


def footprint_from_headers(parts: Sequence[GGUFHeader], path: PurePath) -> Footprint:
    """Footprint from the parsed headers of every split of a GGUF, in order (read locally, or remotely before
    download). `path` names the file in errors, and its stem is the label when general.name is missing."""
    meta = _gguf_meta(parts[0].metadata, path)
    tensors = [(t.name, tuple(t.shape), t.ggml_type) for part in parts for t in part.tensors]
    names = {t[0] for t in tensors}
    meta.update(attn_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names)
    ftype = parts[0].metadata.get("general.file_type")
    label = parts[0].metadata.get("general.name") or path.stem
    return build_footprint(tensors, meta, label=str(label), quant=_ftype_name(ftype), source="gguf")


_FTYPE_NAMES = {0: "f32", 1: "f16", 7: "q8_0", 15: "q4_k_m", 18: "q6_k", 32: "bf16", 17: "q5_k_m",
                14: "q4_k_s", 12: "q3_k_m", 10: "q2_k", 2: "q4_0"}


def _ftype_name(ftype) -> str:
    return _FTYPE_NAMES.get(ftype, f"ftype {ftype}" if ftype is not None else "unknown")


# --------------------------------------------------------------------------------------------
# From the registry (before download)
# --------------------------------------------------------------------------------------------
def spec_tensors(hp: HParams, *, mtp: bool = True, mtp_head_copies: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml shape) of every tensor llama.cpp's converter writes for these hyperparameters."""
    e, v, hd = hp.hidden_size, hp.vocab_size, hp.head_dim
    q, kv = hp.num_attention_heads * hd, hp.num_key_value_heads * hd
    out = [("token_embd.weight", (e, v)), ("output_norm.weight", (e,)), ("output.weight", (e, v))]
    n_all = hp.num_hidden_layers + (hp.num_nextn_predict_layers if mtp else 0)
    for i in range(n_all):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (e,)), (b + "attn_q.weight", (e, q)), (b + "attn_k.weight", (e, kv)),
                (b + "attn_v.weight", (e, kv)), (b + "attn_output.weight", (q, e)),
                (b + "post_attention_norm.weight", (e,))]
        if hp.attention_bias:
            out += [(b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
        if hp.use_qk_norm:
            out += [(b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
        out += _ffn_tensors(b, hp, dense=i < hp.first_k_dense_replace)
        if i >= hp.num_hidden_layers:
            out += [(b + "nextn.eh_proj.weight", (2 * e, e)), (b + "nextn.enorm.weight", (e,)),
                    (b + "nextn.hnorm.weight", (e,)), (b + "nextn.shared_head_norm.weight", (e,))]
            if mtp_head_copies:
                out += [(b + "nextn.shared_head_head.weight", (e, v)), (b + "nextn.embed_tokens.weight", (e, v))]
    return out


def _ffn_tensors(b: str, hp, dense: bool) -> list[tuple[str, tuple[int, ...]]]:
    e = hp.hidden_size
    if dense:
        f = hp.intermediate_size
        return [(b + "ffn_gate.weight", (e, f)), (b + "ffn_up.weight", (e, f)), (b + "ffn_down.weight", (f, e))]
    f, n, sh = hp.moe_intermediate_size, hp.n_routed_experts, hp.moe_intermediate_size * hp.n_shared_experts
    out = [(b + "ffn_gate_inp.weight", (e, n)), (b + "exp_probs_b.bias", (n,)),
           (b + "ffn_gate_exps.weight", (e, f, n)), (b + "ffn_up_exps.weight", (e, f, n)),
           (b + "ffn_down_exps.weight", (f, e, n))]
    if hp.n_shared_experts:
        out += [(b + "ffn_gate_shexp.weight", (e, sh)), (b + "ffn_up_shexp.weight", (e, sh)),
                (b + "ffn_down_shexp.weight", (sh, e))]
    return out


def footprint_from_spec(spec: ModelSpec, quant: str, *, mtp: bool = True) -> Footprint:
    """Predicted footprint of `spec` converted at `quant` (our converter = llama-quantize's types)."""
    quant = normalize_quant(quant)
    hp = spec.hparams
    tensors = spec_tensors(hp, mtp=mtp, mtp_head_copies=spec.mtp_head_copies)
    n_layer_all = hp.num_hidden_layers + (hp.num_nextn_predict_layers if mtp else 0)
    types = plan_types(tensors, quant, n_layer_all, hp.n_routed_experts)
    meta = {"n_layer": hp.num_hidden_layers, "n_nextn": n_layer_all - hp.num_hidden_layers,
            "n_embd": hp.hidden_size, "n_head": hp.num_attention_heads, "n_head_kv": hp.num_key_value_heads,
            "head_dim": hp.head_dim, "n_vocab": hp.vocab_size, "n_ctx_train": hp.max_position_embeddings,
            "n_expert": hp.n_routed_experts, "n_expert_used": hp.num_experts_per_tok,
            "n_ff_exp": hp.moe_intermediate_size, "n_ff_dense": hp.intermediate_size,
            "n_ff_shexp": hp.moe_intermediate_size * hp.n_shared_experts, "n_dense_lead": hp.first_k_dense_replace,
            "attn_bias": hp.attention_bias, "qk_norm": hp.use_qk_norm, "expert_norm": hp.norm_topk_prob,
            "expert_scale": hp.routed_scaling_factor}
    triples = [(name, shape, int(types[name])) for name, shape in tensors]
    return build_footprint(triples, meta, label=spec.display, quant=quant, source="spec")
