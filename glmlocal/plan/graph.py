"""The compute buffer llama.cpp reserves for a GLM-4 MoE model, by replaying its graph allocator.

llama.cpp sizes its compute buffer by building the worst-case graph (one micro-batch of
T = min(n_ubatch, n_ctx) tokens, all of them outputs, attending over the whole cache) and running
ggml-alloc over it: a greedy best-fit allocator that frees each tensor after its last use, runs
element-wise ops in place on a parent whose only consumer they are, and grows the buffer when no
free block fits. The peak is where the allocator happens to be worst, not a sum of live tensors:
the logits often land above a residual stream that sits a few hidden rows up because of earlier
holes. No closed formula follows that; this module rebuilds the same graph (node order = ggml's
depth-first order from the same ggml_build_forward_expand calls as llama.cpp's glm4moe builder and
build_attn / build_moe_ffn) with tensor sizes only, and replays ggml-alloc.c's bookkeeping
(free-block list, in-place reuse, view counting, output tensors never freed: glmlocal.plan.graph_alloc) to
get its answer. For weights spread over backends without op_offload, ggml-backend's scheduler is
replayed first (glmlocal.plan.graph_sched), giving one buffer per backend.

Pure: shapes in, bytes out; no llama.cpp needed. Checked against the "compute buffer size" llama.cpp
logs in tests/test_memory_prediction.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from glmlocal.plan.graph_alloc import ALIGN, INPUT, OUTPUT, Graph, Tensor, replay
from glmlocal.plan.graph_sched import assign_backends, split_copy

__all__ = ["ALIGN", "KV_PAD", "GraphShape", "reserve_bytes", "reserve_bytes_split"]

KV_PAD = 256  # llama.cpp pads the cache size (and so n_kv) to a multiple of this


# ----------------------------------------------------------------------------------------------
# Graph builder (llama.cpp src/models/glm4-moe.cpp + llama-graph.cpp, inference path only)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphShape:
    """Hyperparameters and context settings the glm4moe compute graph depends on."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_dense: int
    n_ff_shexp: int
    n_dense_lead: int
    attn_bias: bool
    qk_norm: bool
    expert_norm: bool
    expert_scale: float
    n_kv: int
    n_tokens: int
    flash_attn: bool
    rot_k: bool = False  # quantized K cache: llama.cpp rotates Q and K with a Hadamard matrix
    rot_v: bool = False  # quantized V cache: V and the attention output are rotated too
    output: bool = True  # the graph ends in the output norm + logits (False: layers only)
    n_outputs: int = 0  # rows that get logits (0: every token, as llama.cpp reserves by default)
    # The main graph as it runs with llama_set_embeddings_nextn(masked=False) (MTP on): the last layer keeps every
    # row and the output rows are picked after the output norm, which stays alive as the NextN hidden state.
    h_all: bool = False
    # The MTP graph (glm4-moe.cpp graph_mtp) instead of the trunk: one NextN layer fed a token embedding and the
    # trunk's hidden state (eh_proj over their concatenation), then its own head norm and LM head.
    mtp: bool = False
    # Where weights live, for the multi-backend replay (None: one backend). Backends are numbered as
    # llama.cpp's scheduler numbers them, GPUs first and the CPU last: (n_backends, output backend,
    # per layer (trunk tensors + KV, ffn_up_exps, ffn_gate_exps, ffn_down_exps)).
    devices: tuple | None = None


def _w(dev: int = 0, weight: bool = True) -> Tensor:
    return Tensor(None, (), (1,), external=True, dev=dev, weight=weight)  # already allocated elsewhere


def _view(a: Tensor, ne, *, offs=0, contig=True) -> Tensor:
    return Tensor("view", (a,), ne, a.esize, view_of=a, offs=offs, contig=contig)


def _op(op, srcs, ne, esize=4) -> Tensor:
    return Tensor(op, srcs, ne, esize)


class _Builder:
    def __init__(self, s: GraphShape):
        self.s, self.g = s, Graph()
        self.cpu = s.devices[0] - 1 if s.devices else 0
        self.dev = 0  # backend of the layer being built
        # llama.cpp pins each layer's norms to the layer's device for small batches or a full offload
        # (llama_context::graph_get_cb), so they do not run where the previous layer ended
        full = bool(s.devices) and all(d[0] != self.cpu for d in s.devices[2])
        self.pin_norms = bool(s.devices) and (s.n_tokens < 32 or full)
        t = s.n_tokens
        self.tokens = Tensor(None, (), (t,), flags=INPUT)
        self.embd_in = Tensor(None, (), (s.n_embd, t), flags=INPUT)
        self.pos = Tensor(None, (), (t,), flags=INPUT)
        self.k_idxs = Tensor(None, (), (t,), 8, flags=INPUT)
        v_trans = not s.flash_attn
        self.v_idxs = Tensor(None, (), (t * (s.n_head_kv * s.head_dim if v_trans else 1),), 8, flags=INPUT)
        self.mask = Tensor(None, (), (s.n_kv, t), 2 if s.flash_attn else 4, flags=INPUT)
        self.out_ids = Tensor(None, (), (s.n_outputs or t,), flags=INPUT)
        nrot = 64
        while s.head_dim % (nrot * 2) == 0:
            nrot *= 2
        ok = s.head_dim % 64 == 0
        self.k_rot = Tensor(None, (), (nrot, nrot), flags=INPUT) if s.rot_k and ok else None
        self.v_rot = Tensor(None, (), (nrot, nrot), flags=INPUT) if s.rot_v and ok else None

    def norm(self, x: Tensor) -> Tensor:
        t = _op("rms_norm", (x,), x.ne)
        t.pin = self.dev if self.pin_norms else None
        return _op("mul", (t, _w(self.dev)), x.ne)

    def mm(self, x: Tensor, rows: int) -> Tensor:
        return _op("mul_mat", (_w(self.dev), x), (rows,) + x.ne[1:])

    def hadamard(self, x: Tensor, rot: Tensor) -> Tensor:
        n = rot.ne[0]
        flat = _view(x, (n, x.nbytes // 4 // n)) if x.contig else _op("cont", (x,), (n, x.nbytes // 4 // n))
        return _view(_op("mul_mat", (rot, flat), flat.ne), x.ne)

    @property
    def n_out(self) -> int:
        return self.s.n_outputs or self.s.n_tokens

    def build(self) -> Graph:
        s, g = self.s, self.g
        if s.mtp:
            return self.build_mtp()
        g.expand(_op("get_rows", (_w(self.cpu), self.tokens), (s.n_embd, s.n_tokens)))  # embeddings stay in RAM
        inp = g.nodes[-1]
        g.expand(self.embd_in)  # ggml_build_forward_select keeps the unused embeddings input as a leaf
        for il in range(s.n_layer):
            inp = self.layer(il, inp)
        if not s.output:
            inp.flags |= OUTPUT
            g.expand(inp)
            return g
        self.dev = s.devices[1] if s.devices else 0
        return self.head(inp, rows_picked=not s.h_all, embd_output=True)

    def head(self, x: Tensor, *, rows_picked: bool, embd_output: bool) -> Graph:
        """Norm + LM head: the norm's output is t_h_nextn (kept: an output); unless the output rows were picked
        before the last FFN, get_rows picks them here (the trunk's t_embd is then that copy, also an output)."""
        s, g = self.s, self.g
        out = _op("mul", (_op("rms_norm", (x,), x.ne), _w(self.dev)), x.ne)
        out.flags |= OUTPUT  # t_h_nextn (the trunk's t_embd too, when no get_rows follows)
        if not rows_picked:
            out = _op("get_rows", (out, self.out_ids), (s.n_embd, self.n_out))
            out.flags |= OUTPUT if embd_output else 0
        logits = _op("mul_mat", (_w(self.dev), out), (s.n_vocab, out.ne[1]))
        logits.flags |= OUTPUT
        g.expand(logits)
        return g

    def build_mtp(self) -> Graph:
        """graph_mtp: h_norm(h) and e_norm(embedding of the token) concatenated, eh_proj, one MoE decoder layer
        over the NextN KV, then the head (every row normed, the output rows picked, logits)."""
        s = self.s
        self.set_layer(0)
        # nextn.embed_tokens (overridden to RAM like token_embd) or token_embd itself
        embd = _op("get_rows", (_w(self.cpu), self.tokens), (s.n_embd, s.n_tokens))
        h = Tensor(None, (), (s.n_embd, s.n_tokens), flags=INPUT)
        e_norm, h_norm = self.norm(embd), self.norm(h)
        cat = _op("concat", (e_norm, h_norm), (2 * s.n_embd, s.n_tokens))
        proj = self.mm(cat, s.n_embd)
        cur = self.attention(self.norm(proj))
        ffn_inp = _op("add", (cur, proj), cur.ne)
        x = self.norm(ffn_inp)
        moe = self.moe(x)
        out = _op("add", (moe, self.ffn(x, s.n_ff_shexp)), moe.ne) if s.n_ff_shexp else moe
        return self.head(_op("add", (out, ffn_inp), out.ne), rows_picked=False, embd_output=False)

    def qkv(self, x: Tensor):
        s = self.s
        t, hd = s.n_tokens, s.head_dim
        out = []
        for heads, has_norm in ((s.n_head, s.qk_norm), (s.n_head_kv, False), (s.n_head_kv, s.qk_norm)):
            cur = self.mm(x, heads * hd)
            if s.attn_bias:
                cur = _op("add", (cur, _w(self.dev)), cur.ne)
            cur = _view(cur, (hd, heads, t))
            if has_norm:
                cur = self.norm(cur)
            out.append(cur)
        q, v, k = out
        return _op("rope", (q, self.pos), q.ne), _op("rope", (k, self.pos), k.ne), v

    def attention(self, x: Tensor) -> Tensor:
        s, g = self.s, self.g
        t, hd = s.n_tokens, s.head_dim
        q, k, v = self.qkv(x)
        if self.k_rot is not None:
            q, k = self.hadamard(q, self.k_rot), self.hadamard(k, self.k_rot)
        if self.v_rot is not None:
            v = self.hadamard(v, self.v_rot)
        for cur in (q, v, k):
            g.expand(cur)
        kv = s.n_head_kv * hd
        kv_w = [_w(self.dev, False) for _ in range(2)]  # the layer's K and V cache
        g.expand(Tensor("set_rows", (_view(k, (kv, t)), self.k_idxs, kv_w[0]), (1,), view_of=kv_w[0]))
        vflat = _view(v, (kv, t)) if s.flash_attn else _view(_view(v, (kv, t)), (1, kv * t))
        g.expand(Tensor("set_rows", (vflat, self.v_idxs, kv_w[1]), (1,), view_of=kv_w[1]))
        qp = _view(_view(q, q.ne), (hd, t, s.n_head), contig=False)
        kc, vc = _view(kv_w[0], (1,), contig=False), _view(kv_w[1], (1,), contig=False)
        if s.flash_attn:
            fa = _op("flash_attn_ext", (qp, kc, vc, self.mask), (hd, s.n_head, t))
            cur = _view(fa, (hd * s.n_head, t))
        else:
            kq = _op("mul_mat", (kc, qp), (s.n_kv, t, s.n_head))
            kq = _op("soft_max", (kq, self.mask), kq.ne)
            kqv = _op("mul_mat", (vc, kq), (hd, t, s.n_head))
            cur = _op("cont", (_view(kqv, (hd, s.n_head, t), contig=False),), (hd * s.n_head, t))
        g.expand(cur)
        if self.v_rot is not None:
            cur = self.hadamard(cur, self.v_rot)
        return self.mm(cur, s.n_embd)

    def set_layer(self, il: int) -> None:
        """Backends of layer il's trunk tensors and of its three expert tensors."""
        if self.s.devices:
            self.dev, *exp = self.s.devices[2][il]
            self.exp_dev = tuple(exp)
        else:
            self.exp_dev = (0, 0, 0)

    def layer(self, il: int, inp: Tensor) -> Tensor:
        s = self.s
        self.set_layer(il)
        cur = self.attention(self.norm(inp))
        if il == s.n_layer - 1 and s.output and not s.h_all:  # only the output rows go on (worst case: all)
            cur = _op("get_rows", (cur, self.out_ids), (cur.ne[0], self.n_out))
            inp = _op("get_rows", (inp, self.out_ids), (inp.ne[0], self.n_out))
        ffn_inp = _op("add", (cur, inp), cur.ne)
        cur = self.norm(ffn_inp)
        if il < s.n_dense_lead:
            out = self.ffn(cur, s.n_ff_dense)
        else:
            moe = self.moe(cur)
            out = _op("add", (moe, self.ffn(cur, s.n_ff_shexp)), moe.ne) if s.n_ff_shexp else moe
        return _op("add", (out, ffn_inp), out.ne)

    def ffn(self, x: Tensor, n_ff: int) -> Tensor:
        gate, up = self.mm(x, n_ff), self.mm(x, n_ff)
        return self.mm(_op("glu", (gate, up), gate.ne), self.s.n_embd)

    def moe(self, x: Tensor) -> Tensor:
        s, g = self.s, self.g
        t, u, e = x.ne[1], s.n_expert_used, s.n_embd  # rows: the last layer may have picked the output rows
        probs = _op("unary", (self.mm(x, s.n_expert),), (s.n_expert, t))  # sigmoid gating
        biased = _op("add", (probs, _w(self.dev)), probs.ne)
        argsort = _op("argsort", (biased,), biased.ne)
        topk = _view(argsort, (u, t), contig=u == s.n_expert)
        weights = _op("get_rows", (_view(probs, (1, s.n_expert, t)), topk), (1, u, t))
        if s.expert_norm:
            w2 = _view(weights, (u, t))
            total = _op("clamp", (_op("sum_rows", (w2,), (1, t)),), (1, t))
            weights = _view(_op("div", (w2, total), w2.ne), (1, u, t))
        if s.expert_scale not in (0.0, 1.0):
            weights = _op("scale", (weights,), weights.ne)
        g.expand(weights)
        x3 = _view(x, (e, 1, t))
        d_up, d_gate, d_down = self.exp_dev
        up = _op("mul_mat_id", (_w(d_up), x3, topk), (s.n_ff_exp, u, t))
        gate = _op("mul_mat_id", (_w(d_gate), x3, topk), (s.n_ff_exp, u, t))
        act = _op("glu", (gate, up), gate.ne)
        experts = _op("mul", (_op("mul_mat_id", (_w(d_down), act, topk), (e, u, t)), weights), (e, u, t))
        g.expand(experts)
        views = [_view(experts, (e, t), offs=i * e * 4, contig=u == 1) for i in range(u)]
        for v in views:
            g.expand(v)
        out = views[0]
        for v in views[1:]:
            out = _op("add", (out, v), (e, t))
            g.expand(out)
        return _op("cont", (out,), (e, t)) if u == 1 else out


# ----------------------------------------------------------------------------------------------
# Replays: ggml-alloc over the graph (one backend), or ggml-backend's scheduler first (several)
# ----------------------------------------------------------------------------------------------
def _replay(g: Graph) -> int:
    """ggml_gallocr_reserve's peak (bytes) for graph g."""
    return replay(g.nodes, g.leafs, lambda t: 0, 1)[0]


def _replay_split(shape: GraphShape) -> tuple[int, ...]:
    n_backends = shape.devices[0]
    g = _Builder(shape).build()
    bk = assign_backends(g, n_backends - 1)
    nodes = split_copy(g, bk)
    return tuple(replay(nodes, g.leafs, lambda t: bk[id(t)], n_backends))


@lru_cache(maxsize=256)
def reserve_bytes_split(shape: GraphShape) -> tuple[int, ...]:
    """Compute buffer per backend (GPUs in order, then the CPU) llama.cpp reserves for a graph whose
    weights are spread as `shape.devices` says, on backends without op_offload (e.g. RPC)."""
    return _replay_split(shape)


@lru_cache(maxsize=256)
def reserve_bytes(shape: GraphShape) -> int:
    """The compute buffer llama.cpp reserves on the CPU backend for this graph shape (bytes)."""
    return _replay(_Builder(shape).build())
