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
(free-block list, in-place reuse, view counting, output tensors never freed) to get its answer.

Pure: shapes in, bytes out; no llama.cpp needed. Checked against the "compute buffer size" llama.cpp
logs in tests/test_memory_prediction.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

ALIGN = 32  # ggml-cpu TENSOR_ALIGNMENT: every compute-buffer allocation is padded to it
KV_PAD = 256  # llama.cpp pads the cache size (and so n_kv) to a multiple of this
# ggml_op_can_inplace for the ops this graph uses
_INPLACE = {"add", "mul", "div", "scale", "rms_norm", "rope", "soft_max", "clamp", "unary"}
_INPUT, _OUTPUT = 1, 2


class _T:
    """A graph tensor reduced to what ggml-alloc looks at."""

    __slots__ = ("contig", "dev", "esize", "external", "flags", "ne", "op", "pin", "size", "src", "view_offs", "view_src",
                 "weight")

    def __init__(self, op, src, ne, esize=4, *, view_of=None, offs=0, contig=True, flags=0, external=False,
                 dev=0, weight=False):
        self.op, self.src, self.ne, self.esize = op, tuple(src), tuple(ne), esize
        self.contig, self.flags, self.external = contig, flags, external
        self.dev, self.weight = dev, weight  # external tensors: the backend holding them; a model weight?
        self.pin = None  # a backend llama.cpp assigns by hand (its graph callback), else None
        self.size = None  # bytes when not the product of ne (a copy of a strided view)
        self.view_src = (view_of.view_src or view_of) if view_of is not None else None
        self.view_offs = (view_of.view_offs if view_of is not None and view_of.view_src else 0) + offs

    @property
    def nbytes(self) -> int:
        if self.size is not None:
            return self.size
        n = self.esize
        for d in self.ne:
            n *= d
        return n

    def same_layout(self, other: _T) -> bool:
        return self.esize == other.esize and self.ne == other.ne and self.contig and other.contig


class _Graph:
    """ggml_cgraph: nodes and leafs in ggml_visit_parents' depth-first, sources-left-to-right order."""

    def __init__(self):
        self.nodes: list[_T] = []
        self.leafs: list[_T] = []
        self._seen: set[int] = set()

    def expand(self, t: _T) -> None:
        stack = [(t, 0)]
        while stack:  # iterative DFS: GLM-4.6's 92 layers nest deeper than Python's recursion limit
            node, i = stack.pop()
            if i == 0:
                if id(node) in self._seen:
                    continue
                self._seen.add(id(node))
            if i < len(node.src):
                stack.append((node, i + 1))
                if node.src[i] is not None and id(node.src[i]) not in self._seen:
                    stack.append((node.src[i], 0))
                continue
            (self.leafs if node.op is None else self.nodes).append(node)


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
    # Where weights live, for the multi-backend replay (None: one backend). Backends are numbered as
    # llama.cpp's scheduler numbers them, GPUs first and the CPU last: (n_backends, output backend,
    # per layer (trunk tensors + KV, ffn_up_exps, ffn_gate_exps, ffn_down_exps)).
    devices: tuple | None = None


def _w(dev: int = 0, weight: bool = True) -> _T:
    return _T(None, (), (1,), external=True, dev=dev, weight=weight)  # already allocated elsewhere


def _view(a: _T, ne, *, offs=0, contig=True) -> _T:
    return _T("view", (a,), ne, a.esize, view_of=a, offs=offs, contig=contig)


def _op(op, srcs, ne, esize=4) -> _T:
    return _T(op, srcs, ne, esize)


class _Builder:
    def __init__(self, s: GraphShape):
        self.s, self.g = s, _Graph()
        self.cpu = s.devices[0] - 1 if s.devices else 0
        self.dev = 0  # backend of the layer being built
        # llama.cpp pins each layer's norms to the layer's device for small batches or a full offload
        # (llama_context::graph_get_cb), so they do not run where the previous layer ended
        full = bool(s.devices) and all(d[0] != self.cpu for d in s.devices[2])
        self.pin_norms = bool(s.devices) and (s.n_tokens < 32 or full)
        t = s.n_tokens
        self.tokens = _T(None, (), (t,), flags=_INPUT)
        self.embd_in = _T(None, (), (s.n_embd, t), flags=_INPUT)
        self.pos = _T(None, (), (t,), flags=_INPUT)
        self.k_idxs = _T(None, (), (t,), 8, flags=_INPUT)
        v_trans = not s.flash_attn
        self.v_idxs = _T(None, (), (t * (s.n_head_kv * s.head_dim if v_trans else 1),), 8, flags=_INPUT)
        self.mask = _T(None, (), (s.n_kv, t), 2 if s.flash_attn else 4, flags=_INPUT)
        self.out_ids = _T(None, (), (t,), flags=_INPUT)
        nrot = 64
        while s.head_dim % (nrot * 2) == 0:
            nrot *= 2
        ok = s.head_dim % 64 == 0
        self.k_rot = _T(None, (), (nrot, nrot), flags=_INPUT) if s.rot_k and ok else None
        self.v_rot = _T(None, (), (nrot, nrot), flags=_INPUT) if s.rot_v and ok else None

    def norm(self, x: _T) -> _T:
        t = _op("rms_norm", (x,), x.ne)
        t.pin = self.dev if self.pin_norms else None
        return _op("mul", (t, _w(self.dev)), x.ne)

    def mm(self, x: _T, rows: int) -> _T:
        return _op("mul_mat", (_w(self.dev), x), (rows,) + x.ne[1:])

    def hadamard(self, x: _T, rot: _T) -> _T:
        n = rot.ne[0]
        flat = _view(x, (n, x.nbytes // 4 // n)) if x.contig else _op("cont", (x,), (n, x.nbytes // 4 // n))
        return _view(_op("mul_mat", (rot, flat), flat.ne), x.ne)

    def build(self) -> _Graph:
        s, g = self.s, self.g
        g.expand(_op("get_rows", (_w(self.cpu), self.tokens), (s.n_embd, s.n_tokens)))  # embeddings stay in RAM
        inp = g.nodes[-1]
        g.expand(self.embd_in)  # ggml_build_forward_select keeps the unused embeddings input as a leaf
        for il in range(s.n_layer):
            inp = self.layer(il, inp)
        if not s.output:
            inp.flags |= _OUTPUT
            g.expand(inp)
            return g
        self.dev = s.devices[1] if s.devices else 0
        out = _op("mul", (_op("rms_norm", (inp,), inp.ne), _w(self.dev)), inp.ne)
        out.flags |= _OUTPUT  # t_embd / t_h_nextn
        logits = _op("mul_mat", (_w(self.dev), out), (s.n_vocab, inp.ne[1]))
        logits.flags |= _OUTPUT
        g.expand(logits)
        return g

    def qkv(self, x: _T):
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

    def attention(self, x: _T) -> _T:
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
        g.expand(_T("set_rows", (_view(k, (kv, t)), self.k_idxs, kv_w[0]), (1,), view_of=kv_w[0]))
        vflat = _view(v, (kv, t)) if s.flash_attn else _view(_view(v, (kv, t)), (1, kv * t))
        g.expand(_T("set_rows", (vflat, self.v_idxs, kv_w[1]), (1,), view_of=kv_w[1]))
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

    def layer(self, il: int, inp: _T) -> _T:
        s = self.s
        if s.devices:
            self.dev, *exp = s.devices[2][il]
            self.exp_dev = tuple(exp)
        else:
            self.exp_dev = (0, 0, 0)
        cur = self.attention(self.norm(inp))
        if il == s.n_layer - 1 and s.output:  # only the output rows go on: all of them in the worst-case graph
            cur = _op("get_rows", (cur, self.out_ids), cur.ne)
            inp = _op("get_rows", (inp, self.out_ids), inp.ne)
        ffn_inp = _op("add", (cur, inp), cur.ne)
        cur = self.norm(ffn_inp)
        if il < s.n_dense_lead:
            out = self.ffn(cur, s.n_ff_dense)
        else:
            moe = self.moe(cur)
            out = _op("add", (moe, self.ffn(cur, s.n_ff_shexp)), moe.ne) if s.n_ff_shexp else moe
        return _op("add", (out, ffn_inp), out.ne)

    def ffn(self, x: _T, n_ff: int) -> _T:
        gate, up = self.mm(x, n_ff), self.mm(x, n_ff)
        return self.mm(_op("glu", (gate, up), gate.ne), self.s.n_embd)

    def moe(self, x: _T) -> _T:
        s, g = self.s, self.g
        t, u, e = s.n_tokens, s.n_expert_used, s.n_embd
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
# ggml-alloc replay (ggml/src/ggml-alloc.c: ggml_dyn_tallocr + ggml_gallocr_alloc_graph_impl)
# ----------------------------------------------------------------------------------------------
def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _Alloc:
    """ggml_dyn_tallocr with one chunk: a sorted free list; the last block is the growable tail."""

    def __init__(self):
        self.free: list[list[int]] = [[0, 1 << 62]]
        self.max_size = 0

    def alloc(self, size: int) -> int:
        size = _pad(size)
        free = self.free
        best, best_size = len(free) - 1, -1  # default: the growable tail
        for i in range(len(free) - 1):  # best fit among the others; ties go to the later block
            bsize = free[i][1]
            if bsize >= size and (best_size < 0 or bsize <= best_size):
                best, best_size = i, bsize
        block = self.free[best]
        addr = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.free[best]
        self.max_size = max(self.max_size, addr + size)
        return addr

    def release(self, addr: int, size: int) -> None:
        size = _pad(size)
        free = self.free
        for i, block in enumerate(free):
            if block[0] + block[1] == addr:
                block[1] += size
                if i + 1 < len(free) and block[0] + block[1] == free[i + 1][0]:
                    block[1] += free[i + 1][1]
                    del free[i + 1]
                return
            if addr + size == block[0]:
                block[0], block[1] = addr, block[1] + size
                if i > 0 and free[i - 1][0] + free[i - 1][1] == block[0]:
                    free[i - 1][1] += block[1]
                    del free[i]
                return
        pos = next((i for i, b in enumerate(free) if b[0] > addr), len(free))
        free.insert(pos, [addr, size])


class _Node:
    __slots__ = ("addr", "allocated", "buf", "n_children", "n_views")

    def __init__(self):
        self.n_children = self.n_views = self.buf = 0
        self.allocated = False
        self.addr = 0


def _replay(g: _Graph) -> int:
    """ggml_gallocr_reserve's peak (bytes) for graph g."""
    return _replay_n(g.nodes, g.leafs, lambda t: 0, 1)[0]


def _replay_n(nodes: list[_T], leafs: list[_T], buf_of, n_bufs: int) -> list[int]:
    """ggml_gallocr_reserve's peak per buffer (one per backend) for a graph whose tensors go to buffer
    buf_of(t). Parents not yet allocated (leafs) go to the buffer of the node using them, as in ggml-alloc.
    Nodes with op "dep" are ggml-backend's GGML_OP_NONE dependency views: they hold a source until
    their position, without counting as a view of it."""
    allocs = [_Alloc() for _ in range(n_bufs)]
    hn: dict[int, _Node] = {}

    def h(t: _T) -> _Node:
        n = hn.get(id(t))
        if n is None:
            n = hn[id(t)] = _Node()
        return n

    def own(t: _T) -> bool:
        return h(t).allocated

    def allocate(t: _T, buf: int) -> None:
        node = h(t)
        if t.external or node.allocated or t.view_src is not None:
            return
        node.allocated, node.buf = True, buf
        a = allocs[buf]
        if t.op in _INPLACE:
            for p in t.src:
                if p is None or p.external or not own(p) or p.flags & _OUTPUT:
                    continue
                if not t.same_layout(p):
                    continue
                ph = h(p)
                if ph.n_children != 1 or ph.n_views != 0:
                    continue
                # (ggml-alloc's reuse-a-view-parent branch is unreachable: a view is never "own")
                node.addr, node.buf, ph.allocated = ph.addr, ph.buf, False
                _free_extra(allocs[ph.buf], p, t, ph.addr)
                return
        node.addr = a.alloc(t.nbytes)

    def free(t: _T) -> None:
        if t.flags & _OUTPUT:
            return
        allocs[h(t).buf].release(h(t).addr, t.nbytes)
        h(t).allocated = False

    for leaf in leafs:
        allocate(leaf, buf_of(leaf))
    for node in nodes:
        if node.view_src is not None and node.op != "dep":
            h(node.view_src).n_views += 1
        for p in node.src:
            if p is not None:
                h(p).n_children += 1
    for node in nodes:
        buf = buf_of(node)
        for p in node.src:
            if p is not None:
                allocate(p, buf)
        allocate(node, buf)
        for p in node.src:
            if p is None:
                continue
            ph = h(p)
            ph.n_children -= 1
            if ph.n_children == 0 and ph.n_views == 0:
                if p.view_src is not None:
                    vs = h(p.view_src)
                    vs.n_views -= 1
                    if vs.n_views == 0 and vs.n_children == 0 and vs.allocated:
                        free(p.view_src)
                elif ph.allocated:
                    free(p)
    return [a.max_size for a in allocs]


def _free_extra(a: _Alloc, parent: _T, node: _T, addr: int) -> None:
    ps, ns = _pad(parent.nbytes), _pad(node.nbytes)
    if ps > ns:
        a.release(addr + ns, ps - ns)


# ----------------------------------------------------------------------------------------------
# ggml-backend's scheduler (ggml_backend_sched_split_graph), for graphs spread over several backends
# ----------------------------------------------------------------------------------------------
_NO_WEIGHT_PICK = {"rope", "flash_attn_ext"}  # llama.cpp skips these when choosing by weight location


def _assign(g: _Graph, cpu: int) -> dict[int, int]:
    """Backend per tensor id: passes 1-4 of ggml_backend_sched_split_graph, for backends without
    op_offload (every backend here supports every op of this graph, and only its own buffers)."""
    bk: dict[int, int] = {id(n): n.pin for n in g.nodes if n.pin is not None}
    for leaf in g.leafs:
        bk[id(leaf)] = leaf.dev if leaf.external else cpu  # weights/cache where they live; inputs on the CPU
    for n in g.nodes:
        if id(n) in bk:
            continue
        if n.view_src is not None and n.view_src.external:
            bk[id(n)] = n.view_src.dev  # a view of the KV cache (set_rows, cache reads)
        elif n.op not in _NO_WEIGHT_PICK:
            w = next((p for p in n.src if p is not None and p.external and p.weight), None)
            if w is not None:
                bk[id(n)] = w.dev
    real = [n for n in g.nodes if n.op != "view"]
    for order, skip_cpu in ((real, True), (real[::-1], True), (real, False), (real[::-1], False)):
        cur = None  # expand GPU assignments down and up (the CPU does not spread), then everything
        for n in order:
            b = bk.get(id(n))
            if b is not None:
                cur = None if (skip_cpu and b == cpu) else b
            elif cur is not None:
                bk[id(n)] = cur
    for n in real:
        if id(n) not in bk:  # the backend holding most of its inputs (ties: the first backend)
            votes = [bk.get(id(p), bk.get(id(p.view_src)) if p.view_src is not None else None) for p in n.src if p]
            bk[id(n)] = min((b for b in votes if b is not None), key=lambda b: (-votes.count(b), b), default=0)
    for n in g.nodes:
        if id(n) not in bk and n.view_src is not None:
            bk[id(n)] = bk.get(id(n.view_src), cpu)
        for p in n.src:
            if p is not None and id(p) not in bk:
                bk[id(p)] = bk.get(id(p.view_src), bk[id(n)]) if p.view_src is not None else bk[id(n)]
    return bk


def _split_copy(g: _Graph, bk: dict[int, int]) -> list[_T]:
    """Pass 5 and the graph copy: cut the node list where the backend changes; a source on another
    backend gets a copy on the split's backend (made once per backend, allocated at the start of the
    split that first needs it, after a dependency node that keeps the source alive until then)."""
    copies: dict[tuple[int, int], _T] = {}
    out: list[_T] = []
    pending: list[_T] = []  # the current split's nodes
    cur, n_inputs = None, 0
    for n in g.nodes:
        if n.op == "view":
            pending.append(n)
            continue
        b = bk[id(n)]
        if b != cur:
            out.extend(pending)
            pending, cur, n_inputs = [], b, 0
        srcs = list(n.src)
        for j, p in enumerate(srcs):
            if p is None or bk[id(p)] == b:
                continue
            key = (id(p), b)
            if key not in copies:
                cpy = copies[key] = _T("copy", (), p.ne, p.esize)
                if not p.contig and p.view_src is not None and len(p.ne) == 2:  # ggml_nbytes of the strided view
                    cpy.size = p.esize * (p.ne[0] + (p.ne[1] - 1) * p.view_src.ne[0])
                bk[id(cpy)] = b
                dep = _T("dep", (p,), p.ne, p.esize, view_of=p)
                bk[id(dep)] = bk[id(p)]
                pending[2 * n_inputs:2 * n_inputs] = [dep, cpy]  # the split's inputs come first, in order
                n_inputs += 1
            srcs[j] = copies[key]
        n.src = tuple(srcs)
        pending.append(n)
    out.extend(pending)
    return out


def _replay_split(shape: GraphShape) -> tuple[int, ...]:
    n_backends = shape.devices[0]
    g = _Builder(shape).build()
    bk = _assign(g, n_backends - 1)
    nodes = _split_copy(g, bk)
    return tuple(_replay_n(nodes, g.leafs, lambda t: bk[id(t)], n_backends))


@lru_cache(maxsize=256)
def reserve_bytes_split(shape: GraphShape) -> tuple[int, ...]:
    """Compute buffer per backend (GPUs in order, then the CPU) llama.cpp reserves for a graph whose
    weights are spread as `shape.devices` says, on backends without op_offload (e.g. RPC)."""
    return _replay_split(shape)


@lru_cache(maxsize=256)
def reserve_bytes(shape: GraphShape) -> int:
    """The compute buffer llama.cpp reserves on the CPU backend for this graph shape (bytes)."""
    return _replay(_Builder(shape).build())
