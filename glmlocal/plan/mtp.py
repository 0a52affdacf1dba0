"""What GLM's MTP (NextN) head costs in memory when speculative decoding loads it, and where each part lives.

llama.cpp loads the NextN block only with llama_model_params.load_mtp, and drafts with it through a second
context (ctx_type MTP) that runs graph_mtp: one MoE decoder layer over its own KV cache, then an LM head. So
MTP on costs, beside the trunk's own:
- weights: the NextN block (blk.{n_layer}.*): attention, router, shared expert, eh_proj and norms, plus the
  GLM-4.5 layout's own shared head and token embedding. It is layer slot n_layer, which -ngl puts on the device
  of the last trunk layer; its routed experts follow the trunk's rule (GPU when room is left, else `-ot ...=CPU`)
  and its own token embedding, like token_embd, only feeds get_rows and stays in RAM (`-ot ...=CPU`);
- KV: the MTP context's cache holds the NextN layer only (one layer x n_ctx, at the KV type), on that device;
- compute: the MTP context's buffer (graph_mtp replayed by glmlocal.plan.graph at the main context's ubatch, with
  n_outputs_max = n_seq: its decodes ask logits for at most one entry per sequence), plus RAM-side buffers
  (token embeddings, logits rows and the NextN hidden rows both contexts hand over).

Pure: numbers from a Footprint. glmlocal.plan.layout adds them to a layout; glmlocal.plan.speed estimates the gain.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmlocal.plan.footprint import Footprint, kv_row_bytes, mtp_compute_buffer_bytes

MAX_DRAFT = 3  # drafts per step the MTP context's batch capacity is sized for (published acceptance stops at 3)


@dataclass(frozen=True)
class MtpCost:
    """Bytes MTP adds, by part (0 everywhere for a model without a NextN block)."""

    weights: int  # NextN block less its routed experts and own embedding: beside the last trunk layer
    embd: int  # its own token embedding (GLM-4.5 layout): RAM
    experts: int  # its routed experts: GPU when room is left after the trunk's, else RAM
    largest_expert: int  # its largest routed-expert tensor (the op_offload copy slot when they stay in RAM)
    kv: int  # the MTP context's KV cache: one layer x n_ctx
    compute: int  # the MTP context's compute buffer, on the device that runs it (RAM in a CPU-only plan)
    host: int  # RAM-side buffers of both contexts for the hand-over (embeddings, logits rows, hidden rows)

    @property
    def beside_last_layer(self) -> int:
        """What has to fit next to the last trunk layer for MTP to run there (experts aside)."""
        return self.weights + self.kv + self.compute


def mtp_batch(n_batch: int, n_seq: int, n_draft: int = MAX_DRAFT) -> int:
    """n_batch of the MTP context: a prompt chunk's pairs plus, per sequence, the accepted drafts and a root."""
    return n_batch + n_seq * (1 + n_draft)


def mtp_cost(fp: Footprint, ctx: int, *, n_ubatch: int, n_batch: int, n_seq: int, type_k: str,
             type_v: str) -> MtpCost | None:
    """MTP's bytes for a model with a NextN block (None without one) at `ctx` tokens of context."""
    layer = fp.mtp_layer
    if layer is None:
        return None
    kv_dim = fp.n_head_kv * fp.head_dim
    kv = (kv_row_bytes(type_k, kv_dim) + kv_row_bytes(type_v, kv_dim)) * ctx
    compute = mtp_compute_buffer_bytes(fp, ctx, n_ubatch, n_seq=n_seq, type_k=type_k, type_v=type_v)
    t = min(n_ubatch, ctx)
    rows = mtp_batch(n_batch, n_seq) + n_batch  # NextN rows (n_embd floats) of the MTP and the main context
    host = 2 * fp.n_embd * 4 * t + fp.n_vocab * 4 * n_seq + fp.n_embd * 4 * rows
    return MtpCost(weights=layer.non_expert - layer.nextn_embd, embd=layer.nextn_embd, experts=layer.experts,
                   largest_expert=max((nb for _, nb in layer.expert_tensors), default=0), kv=kv,
                   compute=compute, host=host)


def own_head(fp: Footprint) -> bool:
    """Whether the NextN block has its own LM head (GLM-4.5 layout); else graph_mtp uses output.weight."""
    return f"blk.{fp.n_layer}.nextn.shared_head_head.weight" in fp.tensor_types


def mtp_overrides(fp: Footprint, experts_in_ram: bool) -> list[tuple[str, str]]:
    """`-ot` patterns that keep the NextN block's own embedding, and its experts when they stay, in RAM."""
    layer = fp.mtp_layer
    out = []
    if layer is not None and layer.nextn_embd:
        out.append((rf"blk\.{layer.index}\.nextn\.embed_tokens", "CPU"))
    if layer is not None and layer.experts and experts_in_ram:
        out.append((rf"blk\.{layer.index}\.ffn_(up|down|gate)_exps", "CPU"))
    return out
