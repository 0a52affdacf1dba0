"""ggml-backend's scheduler (ggml_backend_sched_split_graph), replayed for a graph spread over several backends.

When backends do not offload ops (RPC devices, --no-op-offload), each op runs on the backend holding its
weights; the scheduler assigns every node a backend, cuts the node list where the backend changes, and
gives each split a copy of the inputs that live elsewhere. Those copies and the split order are what
the per-backend compute buffers hold, so glmlocal.plan.graph replays this before ggml-alloc.

Pure: works on glmlocal.plan.graph_alloc's Tensor / Graph.
"""

from __future__ import annotations

from glmlocal.plan.graph_alloc import Graph, Tensor

_NO_WEIGHT_PICK = {"rope", "flash_attn_ext"}  # llama.cpp skips these when choosing by weight location


def assign_backends(g: Graph, cpu: int) -> dict[int, int]:
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


def split_copy(g: Graph, bk: dict[int, int]) -> list[Tensor]:
    """Pass 5 and the graph copy: cut the node list where the backend changes; a source on another
    backend gets a copy on the split's backend (made once per backend, allocated at the start of the
    split that first needs it, after a dependency node that keeps the source alive until then)."""
    copies: dict[tuple[int, int], Tensor] = {}
    out: list[Tensor] = []
    pending: list[Tensor] = []  # the current split's nodes
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
                cpy = copies[key] = Tensor("copy", (), p.ne, p.esize)
                if not p.contig and p.view_src is not None and len(p.ne) == 2:  # ggml_nbytes of the strided view
                    cpy.size = p.esize * (p.ne[0] + (p.ne[1] - 1) * p.view_src.ne[0])
                bk[id(cpy)] = b
                dep = Tensor("dep", (p,), p.ne, p.esize, view_of=p)
                bk[id(dep)] = bk[id(p)]
                pending[2 * n_inputs:2 * n_inputs] = [dep, cpy]  # the split's inputs come first, in order
                n_inputs += 1
            srcs[j] = copies[key]
        n.src = tuple(srcs)
        pending.append(n)
    out.extend(pending)
    return out
