"""ggml's compute graph reduced to what its allocator looks at, and a replay of that allocator.

`Tensor` and `Graph` carry only shapes, element sizes, sources, views and flags. `replay` runs
ggml-alloc.c's bookkeeping over a graph (ggml_dyn_tallocr + ggml_gallocr_alloc_graph_impl): a greedy
best-fit allocator that frees each tensor after its last use, runs element-wise ops in place on a parent
whose only consumer they are, never frees outputs, and grows the buffer when no free block fits. Its
answer is the peak size of each buffer, which is what llama.cpp reserves as a compute buffer.

Pure: no ggml needed. glmlocal.plan.graph builds the graphs; glmlocal.plan.graph_sched spreads one over
several backends first.
"""

from __future__ import annotations

from collections.abc import Callable

ALIGN = 32  # ggml-cpu TENSOR_ALIGNMENT: every compute-buffer allocation is padded to it
# ggml_op_can_inplace for the ops this graph uses
_INPLACE = {"add", "mul", "div", "scale", "rms_norm", "rope", "soft_max", "clamp", "unary"}
INPUT, OUTPUT = 1, 2  # ggml tensor flags


class Tensor:
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

    def same_layout(self, other: Tensor) -> bool:
        return self.esize == other.esize and self.ne == other.ne and self.contig and other.contig


class Graph:
    """ggml_cgraph: nodes and leafs in ggml_visit_parents' depth-first, sources-left-to-right order."""

    def __init__(self):
        self.nodes: list[Tensor] = []
        self.leafs: list[Tensor] = []
        self._seen: set[int] = set()

    def expand(self, t: Tensor) -> None:
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
    """ggml_gallocr's hash-set entry for one tensor."""

    __slots__ = ("addr", "allocated", "buf", "n_children", "n_views")

    def __init__(self):
        self.n_children = self.n_views = self.buf = 0
        self.allocated = False
        self.addr = 0


class _Replay:
    """ggml_gallocr over one graph: per-tensor bookkeeping plus one dynamic allocator per buffer."""

    def __init__(self, n_bufs: int):
        self.allocs = [_Alloc() for _ in range(n_bufs)]
        self.hn: dict[int, _Node] = {}

    def h(self, t: Tensor) -> _Node:
        n = self.hn.get(id(t))
        if n is None:
            n = self.hn[id(t)] = _Node()
        return n

    def count_uses(self, nodes: list[Tensor]) -> None:
        """Children and views of every tensor (ggml_gallocr_alloc_graph_impl's counting pass)."""
        for node in nodes:
            if node.view_src is not None and node.op != "dep":
                self.h(node.view_src).n_views += 1
            for p in node.src:
                if p is not None:
                    self.h(p).n_children += 1

    def allocate(self, t: Tensor, buf: int) -> None:
        node = self.h(t)
        if t.external or node.allocated or t.view_src is not None:
            return
        node.allocated, node.buf = True, buf
        if t.op in _INPLACE:
            for p in t.src:
                if p is None or p.external or not self.h(p).allocated or p.flags & OUTPUT:
                    continue
                if not t.same_layout(p):
                    continue
                ph = self.h(p)
                if ph.n_children != 1 or ph.n_views != 0:
                    continue
                # (ggml-alloc's reuse-a-view-parent branch is unreachable: a view is never "own")
                node.addr, node.buf, ph.allocated = ph.addr, ph.buf, False
                _free_extra(self.allocs[ph.buf], p, t, ph.addr)
                return
        node.addr = self.allocs[buf].alloc(t.nbytes)

    def free(self, t: Tensor) -> None:
        if t.flags & OUTPUT:
            return
        self.allocs[self.h(t).buf].release(self.h(t).addr, t.nbytes)
        self.h(t).allocated = False

    def release_parents(self, node: Tensor) -> None:
        """Free each source of `node` (or the tensor it views) whose last consumer `node` was."""
        for p in node.src:
            if p is None:
                continue
            ph = self.h(p)
            ph.n_children -= 1
            if ph.n_children == 0 and ph.n_views == 0:
                if p.view_src is not None:
                    vs = self.h(p.view_src)
                    vs.n_views -= 1
                    if vs.n_views == 0 and vs.n_children == 0 and vs.allocated:
                        self.free(p.view_src)
                elif ph.allocated:
                    self.free(p)


def replay(nodes: list[Tensor], leafs: list[Tensor], buf_of: Callable[[Tensor], int], n_bufs: int) -> list[int]:
    """ggml_gallocr_reserve's peak per buffer (one per backend) for a graph whose tensors go to buffer
    buf_of(t). Parents not yet allocated (leafs) go to the buffer of the node using them, as in ggml-alloc.
    Nodes with op "dep" are ggml-backend's GGML_OP_NONE dependency views: they hold a source until
    their position, without counting as a view of it."""
    r = _Replay(n_bufs)
    for leaf in leafs:
        r.allocate(leaf, buf_of(leaf))
    r.count_uses(nodes)
    for node in nodes:
        buf = buf_of(node)
        for p in node.src:
            if p is not None:
                r.allocate(p, buf)
        r.allocate(node, buf)
        r.release_parents(node)
    return [a.max_size for a in r.allocs]


def _free_extra(a: _Alloc, parent: Tensor, node: Tensor, addr: int) -> None:
    ps, ns = _pad(parent.nbytes), _pad(node.nbytes)
    if ps > ns:
        a.release(addr + ns, ps - ns)
