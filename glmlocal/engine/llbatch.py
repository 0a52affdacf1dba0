"""A llama_batch over numpy arrays, shared by the decode loop (tokens) and the MTP context (token + hidden row)."""

from __future__ import annotations

import ctypes

import llama_cpp.llama_cpp as C
import numpy as np


class ArrayBatch:
    """Room for `cap` entries, one sequence id each; with `n_embd`, an embedding row per entry as well (graph_mtp
    reads both). `put` appends a span; `decode` sends the first `n` entries and leaves them in place."""

    def __init__(self, cap: int, n_embd: int = 0):
        self.cap, self.n = cap, 0
        self.tok, self.pos = np.zeros(cap, np.int32), np.zeros(cap, np.int32)
        self.n_seq, self.seq, self.out = np.ones(cap, np.int32), np.zeros(cap, np.int32), np.zeros(cap, np.int8)
        self.embd = np.zeros((cap, n_embd), np.float32) if n_embd else None
        ptr = ctypes.POINTER(C.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (ptr * cap)(*[ctypes.cast(base + 4 * i, ptr) for i in range(cap)])
        b = self.raw = C.llama_batch()
        b.token = self.tok.ctypes.data_as(ctypes.POINTER(C.llama_token))
        if self.embd is not None:
            b.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(C.llama_pos))
        b.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ptr))
        b.logits = self.out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def put(self, seq_id: int, tokens: list[int], pos0: int) -> int:
        """Append tokens at positions pos0.. of seq_id, none with an output yet; the span's first index."""
        a, n = self.n, len(tokens)
        self.tok[a:a + n], self.pos[a:a + n], self.seq[a:a + n] = tokens, np.arange(pos0, pos0 + n), seq_id
        self.out[a:a + n] = 0
        self.n += n
        return a

    def decode(self, ctx: C.llama_context_p) -> int:
        self.raw.n_tokens = self.n
        return C.llama_decode(ctx, self.raw)
