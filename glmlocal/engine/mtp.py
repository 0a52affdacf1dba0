"""GLM's own draft model: the NextN (MTP) layer, run by a second llama.cpp context beside the main one.

llama.cpp (the build llama-cpp-python 0.3.36 bundles) runs glm4moe's NextN block as a context of type
LLAMA_CONTEXT_TYPE_MTP: its graph (graph_mtp) takes, per entry, a token id AND a hidden-state row, and keeps its
own KV cache for that one layer. common/speculative.cpp (draft-mtp) drives it; this is the same algorithm:

- Pairing. Let h_q be the main context's final hidden row at position q (after output_norm: what its LM head
  reads; llama_get_embeddings_nextn with masked=False gives one per batch entry). The MTP KV entry at position q
  is the pair (token x_q, h_{q-1}); position 0 pairs with a zero row. The MTP context sees every position the
  main one keeps, prompt included, built from the MAIN rows only.
- Drafting from position p (the pending token x_p, not yet in the main KV): decode the root pair (x_p, h_{p-1});
  its logits guess x_{p+1} = d_1. Step j feeds (d_j, h'_{j}) at p + j, where h' is the MTP context's own NextN
  row of the previous step, and guesses d_{j+1}. Drafts are greedy (the argmax).
- Afterwards the draft steps' pairs (built from MTP rows) are removed; the root stays: it is exactly the pair
  the main decode of x_p will confirm, so a verification only has to add the accepted drafts' pairs.
- Lazily: the pairs of a main decode wait in `pending` until the next draft (they ride in its first MTP decode,
  with the root), or until n_batch/2 of them gathered (a long prompt); rejected drafts never reach the MTP KV.
- A full pool: the MTP context's KV pool has as many cells as the main one but holds more (each sequence's draft
  root, a draft's own pairs), so it runs out of room first. An MTP llama_decode that finds no room changes
  nothing: its pairs stay pending (a draft is skipped, or ends with the drafts it has), and the main pool, then
  only a few cells from full itself, frees room in both when it overflows (engine/batch.py). A blob saved while
  the pending pairs find no room is a cold start at the sequence's position.
- Dormant: when speculation stops using MTP (`keep_up` False, engine/spec.py's measurements) the main context
  stops handing rows over and this context forgets everything; when MTP is wanted again each sequence restarts
  cold at its current position (its MTP KV then only covers what follows), so MTP costs nothing while unused.

`MtpContext` is an engine/hooks.py DecodeObserver (it reads the main rows after every main decode) and KvMirror
(every KV operation on the main context is repeated here: rollback, prefix truncation, seq_cp, clear, and the
saved state of a stashed or preempted sequence carries this context's state and last hidden row with it). A
verification's outcome arrives as the loop's rollback (seq_rm) or, when everything was kept, at the next touch.

Pitfalls (measured, /work/scratch/mtp/NOTES.md): masked=True on the MTP context returns the wrong row when a
batch mixes output and non-output entries, so both contexts run unmasked and rows are indexed by batch position;
an MTP context on a model loaded without load_mtp aborts the process (open() refuses it first); a wrongly paired
row is silent (only acceptance drops), which is why tests check MTP logits against an independent rebuild.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as C
import llama_cpp.llama_cpp_ext as X
import numpy as np

from glmlocal.engine.hooks import SeqRows, StateBlob
from glmlocal.engine.llbatch import ArrayBatch
from glmlocal.errors import EngineError

_FOOTER = 3  # int64s after a saved blob's state: next position, has-row flag, state length


def has_nextn(model: C.llama_model_p) -> bool:
    """Whether the GGUF carries the one NextN block llama.cpp's graph_mtp runs (GLM-4.5 / 4.6 / 4.7 do)."""
    return C.llama_model_n_layer_nextn(model) == 1


@dataclass
class _Staged:
    """A main decode's pairs for one sequence, waiting to learn how many of its tokens stay (drafts)."""

    pos0: int
    tokens: tuple[int, ...]
    rows: np.ndarray  # main hidden rows, one per token
    h_prev: np.ndarray  # main row of pos0 - 1 (pairs with tokens[0])
    first: int  # tokens before this index already have their pair in the MTP KV (the draft root)


@dataclass
class _Lane:
    """One llama.cpp sequence of the MTP context: its KV holds pairs for positions < kv_end (a cold lane holds
    none below the position it restarted at); `pending` pairs follow, not yet decoded."""

    kv_end: int = 0
    toks: list[int] = field(default_factory=list)
    hs: list[np.ndarray] = field(default_factory=list)  # hs[i] = main row of position kv_end + i - 1
    h_last: np.ndarray | None = None  # main row of position next_pos - 1 (None: unknown)
    staged: _Staged | None = None
    root: int | None = None  # the draft root's token, kept at kv_end - 1 until the main decode confirms it

    @property
    def next_pos(self) -> int:
        return self.kv_end + len(self.toks)


class _PairBatch(ArrayBatch):
    """A classic llama_batch carrying a token id and an embedding row per entry (graph_mtp reads both)."""

    def add(self, seq: int, tokens: Sequence[int], pos0: int, rows: Sequence[np.ndarray], out: bool = False) -> int:
        """Append pairs (tokens[i], rows[i]) at pos0 + i; the last gets logits when `out`. Its batch index."""
        a = self.put(seq, list(tokens), pos0)
        self.embd[a:self.n] = rows
        self.out[self.n - 1] = 1 if out else 0
        return self.n - 1


class MtpContext:
    """The MTP context of one Engine: mirrors the main context's KV per sequence and drafts from it. Used from
    the decode thread only (the engine attaches it as a DecodeObserver and a KvMirror)."""

    def __init__(self, model: C.llama_model_p, ctx: C.llama_context_p, main: C.llama_context_p):
        self._ctx, self._main, self._mem = ctx, main, C.llama_get_memory(ctx)
        self.n_embd = C.llama_model_n_embd_out(model)
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
        self.n_batch = C.llama_n_batch(ctx)
        self._batch = _PairBatch(self.n_batch, self.n_embd)
        self._zero = np.zeros(self.n_embd, np.float32)
        self._lanes: dict[int, _Lane] = {}
        self._rows = np.zeros((C.llama_n_batch(main), self.n_embd), np.float32)  # the main rows of one decode
        self._keep_up = True
        self.no_room = 0  # MTP decodes refused for lack of KV room (a draft skipped or cut short)
        self._root_idx = -1  # batch index of the last draft's root (root_logits)

    @classmethod
    def open(cls, model: C.llama_model_p, main: C.llama_context_p, params: C.llama_context_params,
             *, loaded_mtp: bool) -> MtpContext:
        """Create the MTP context for `main` (params: engine/params.py mtp_context_params). The model must have
        been loaded with load_mtp: llama.cpp aborts the process otherwise, so this refuses first."""
        if not has_nextn(model):
            raise EngineError("this GGUF has no NextN (MTP) layer", hint="use --spec ngram")
        if not loaded_mtp or params.ctx_type != C.LLAMA_CONTEXT_TYPE_MTP:
            raise EngineError("the MTP context needs a model loaded with its NextN layer and MTP context params")
        ctx = C.llama_init_from_model(model, params)
        if not ctx:
            raise EngineError("llama.cpp could not create the MTP context")
        # Unmasked on both: a row for every batch entry, in batch order (masked rows are wrong on graph_mtp).
        X.llama_set_embeddings_nextn(main, True, False)
        X.llama_set_embeddings_nextn(ctx, True, False)
        return cls(model, ctx, main)

    @property
    def keep_up(self) -> bool:
        """Whether MTP is in use: the lanes follow the main context (False: dormant, see the module doc)."""
        return self._keep_up

    @keep_up.setter
    def keep_up(self, on: bool) -> None:
        if on != self._keep_up:
            self._keep_up = on
            X.llama_set_embeddings_nextn(self._main, on, False)
            if not on:
                self.clear()

    def close(self) -> None:
        if self._ctx:
            X.llama_set_embeddings_nextn(self._main, False, False)
            C.llama_free(self._ctx)
            self._ctx = None

    # ------------------------------------------------------------------ DecodeObserver
    def after_decode(self, ctx: C.llama_context_p, rows: Sequence[SeqRows]) -> None:
        """Stage each sequence's pairs from the main rows just computed (how many stay is known later)."""
        if not self._keep_up:
            return
        n_rows = max(r.first_row + len(r.tokens) for r in rows)
        ptr = X.llama_get_embeddings_nextn(ctx)
        if not ptr:
            raise EngineError("the main context gave no NextN rows (embeddings_nextn is off)")
        hidden = self._rows
        ctypes.memmove(hidden.ctypes.data, ptr, n_rows * self.n_embd * 4)
        for r in rows:
            lane = self._lane(r.seq_id)
            self._resolve(lane, None)
            first = 0
            if lane.root is not None and not lane.toks and r.pos0 == lane.kv_end - 1 and r.tokens[0] == lane.root:
                first = 1
            elif r.pos0 != lane.next_pos:
                self._realign(r.seq_id, lane, r.pos0)
            if lane.h_last is None and r.pos0 > 0 and C.llama_memory_seq_pos_max(self._mem, r.seq_id) < 0:
                first, lane.kv_end = 1, r.pos0 + 1  # a cold start: begin with the first pair whose row is known
            lane.root = None
            h_prev = lane.h_last if lane.h_last is not None else self._zero
            block = hidden[r.first_row:r.first_row + len(r.tokens)].copy()
            lane.staged = _Staged(r.pos0, r.tokens, block, h_prev, first)
            if r.n_draft == 0:
                self._resolve(lane, None)  # nothing to roll back: every token stays
            self._bound(r.seq_id, lane)

    # ------------------------------------------------------------------ KvMirror
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        if not self._keep_up:
            return
        lane = self._lane(seq_id)
        end = lane.staged.pos0 + len(lane.staged.tokens) if lane.staged else lane.next_pos
        if 0 <= p1 < end:
            self._reset(seq_id, lane)  # a hole or a cut head: never done by the loop; start over cold
            return
        self._resolve(lane, max(p0, 0))
        self._cut(seq_id, lane, max(p0, 0))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if not self._keep_up:
            return
        a = self._lane(src)
        self._resolve(a, None)
        self._flush(src, a)  # pairs that find no room stay pending, and are copied as pending
        C.llama_memory_seq_cp(self._mem, src, dst, p0, p1)
        confirmed = a.kv_end - (a.root is not None)  # an unconfirmed draft root stays the source's own
        C.llama_memory_seq_rm(self._mem, dst, confirmed, -1)
        lane = self._lanes[dst] = _Lane(kv_end=confirmed, toks=list(a.toks), hs=list(a.hs), h_last=a.h_last)
        if p1 >= 0:
            self._cut(dst, lane, p1)

    def clear(self) -> None:
        C.llama_memory_clear(self._mem, True)
        self._lanes.clear()

    def save(self, seq_id: int) -> StateBlob | None:
        """This sequence's MTP state, its position and last main row, as one blob."""
        lane = self._lane(seq_id)
        self._resolve(lane, None)
        if self._keep_up and self._flush(seq_id, lane) is None:
            return self._blob(b"", lane.next_pos, lane.h_last)  # no room for the pending pairs: a cold start
        if lane.root is not None:
            self._cut(seq_id, lane, lane.kv_end - 1)
        size = C.llama_state_seq_get_size(self._ctx, seq_id)
        state = (ctypes.c_uint8 * max(size, 1))()
        n = C.llama_state_seq_get_data(self._ctx, state, size, seq_id) if size else 0
        return self._blob(bytes(state)[:n], lane.kv_end, lane.h_last)

    def _blob(self, state: bytes, kv_end: int, h_last: np.ndarray | None) -> StateBlob:
        """The MTP state, then the last main row, then the footer (restore reads it from the end)."""
        row = h_last if h_last is not None else self._zero
        footer = np.array([kv_end, h_last is not None, len(state)], np.int64)
        data = state + row.astype(np.float32).tobytes() + footer.tobytes()
        return (ctypes.c_uint8 * len(data)).from_buffer_copy(data)

    def restore(self, seq_id: int, blob: StateBlob) -> bool:
        if not self._keep_up:
            return True  # dormant: nothing to restore into, the lane starts cold when MTP is wanted again
        raw = bytes(blob)
        kv_end, has_row, n = (int(x) for x in np.frombuffer(raw[-8 * _FOOTER:], np.int64))
        row = np.frombuffer(raw[n:n + 4 * self.n_embd], np.float32).copy()
        C.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        if n and (kv_end or has_row):  # a blob saved while dormant holds nothing
            buf = (ctypes.c_uint8 * n).from_buffer_copy(raw[:n])
            if not C.llama_state_seq_set_data(self._ctx, buf, n, seq_id):
                self._lanes[seq_id] = _Lane()
                return False
        self._lanes[seq_id] = _Lane(kv_end=kv_end, h_last=row if has_row else None)
        return True

    # ------------------------------------------------------------------ drafting
    def draft(self, seq_id: int, token: int, pos: int, n_max: int) -> list[int]:
        """Up to n_max greedy guesses for the tokens after `token` at `pos` (the pending token; the main KV
        holds positions < pos). Empty when the lane does not know the hidden row before pos yet, or when the
        MTP KV has no room for the root; fewer when it has none for a later step."""
        lane = self._lane(seq_id)
        self._resolve(lane, None)
        if lane.next_pos != pos:
            self._realign(seq_id, lane, pos)
        if lane.h_last is None or n_max < 1 or not self._keep_up:
            return []
        b = self._batch
        staged = self._flush(seq_id, lane, reserve=1)
        if staged is None:
            return []
        idx = b.add(seq_id, [token], pos, [lane.h_last], out=True)
        if not self._decode_for(seq_id, lane):
            return []  # nothing of that batch is in the KV: the pending pairs wait for the next try
        self._commit(lane, staged)
        lane.kv_end, lane.root, self._root_idx = pos + 1, token, idx
        drafts = [self._argmax(idx)]
        try:
            for j in range(1, n_max):
                idx = b.add(seq_id, [drafts[-1]], pos + j, [self._row(idx)], out=True)
                if not self._decode_for(seq_id, lane):
                    break  # no room for one more step: the drafts so far stand
                drafts.append(self._argmax(idx))
        finally:
            if n_max > 1:
                C.llama_memory_seq_rm(self._mem, seq_id, pos + 1, -1)  # pairs built from MTP rows: never kept
        return drafts

    def root_logits(self) -> np.ndarray:
        """The MTP logits of the last draft's root, when it drafted one token (a copy; tests compare them with
        an MTP context rebuilt from scratch)."""
        p = C.llama_get_logits_ith(self._ctx, self._root_idx)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def position_end(self, seq_id: int) -> int:
        """The next position this sequence's lane expects (tests: it follows the main KV)."""
        lane = self._lane(seq_id)
        self._resolve(lane, None)
        return lane.next_pos

    def kv_pos_max(self, seq_id: int) -> int:
        return C.llama_memory_seq_pos_max(self._mem, seq_id)

    def kv_pos_min(self, seq_id: int) -> int:
        """The first position the lane's KV holds (> 0: it restarted cold there; -1: empty)."""
        return C.llama_memory_seq_pos_min(self._mem, seq_id)

    # ------------------------------------------------------------------ bookkeeping
    def _lane(self, seq_id: int) -> _Lane:
        lane = self._lanes.get(seq_id)
        if lane is None:
            lane = self._lanes[seq_id] = _Lane()
        return lane

    def _resolve(self, lane: _Lane, cut: int | None) -> None:
        """Move the staged pairs of positions < cut (None: all) to pending; h_last follows the last kept."""
        s = lane.staged
        if s is None:
            return
        lane.staged = None
        end = s.pos0 + len(s.tokens) if cut is None else min(cut, s.pos0 + len(s.tokens))
        for q in range(s.pos0 + s.first, end):
            lane.toks.append(s.tokens[q - s.pos0])
            lane.hs.append(s.rows[q - s.pos0 - 1] if q > s.pos0 else s.h_prev)
        if end > s.pos0:
            lane.h_last = s.rows[end - s.pos0 - 1]

    def _cut(self, seq_id: int, lane: _Lane, p0: int) -> None:
        """Keep positions < p0."""
        if p0 >= lane.next_pos:
            return
        if p0 >= lane.kv_end:  # inside pending: the dropped pair at p0 carries the row of p0 - 1
            i = p0 - lane.kv_end
            lane.h_last = lane.hs[i]
            del lane.toks[i:], lane.hs[i:]
            return
        root_only = lane.root is not None and not lane.toks and p0 == lane.kv_end - 1
        C.llama_memory_seq_rm(self._mem, seq_id, p0, -1)
        lane.kv_end, lane.root = p0, None
        lane.toks.clear(), lane.hs.clear()
        if not root_only:
            lane.h_last = None if p0 > 0 else self._zero  # the row before p0 is gone with the main decode

    def _realign(self, seq_id: int, lane: _Lane, pos: int) -> None:
        """The main context is at `pos` but this lane is elsewhere: cut back, or restart cold at pos."""
        if lane.next_pos > pos:
            self._cut(seq_id, lane, pos)
        if lane.next_pos < pos:
            self._reset(seq_id, lane)
            lane.kv_end = pos  # an empty sequence accepts any first position

    def _reset(self, seq_id: int, lane: _Lane) -> None:
        C.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        lane.kv_end, lane.root, lane.staged, lane.h_last = 0, None, None, None
        lane.toks.clear(), lane.hs.clear()

    def _bound(self, seq_id: int, lane: _Lane) -> None:
        """Decode the pending pairs once half a batch gathered (a long prompt, or many steps without drafts).
        Without room they stay pending: the main pool is then within a few cells of full (the MTP pool holds at
        most one draft root per sequence more than it) and frees room in both at its next overflow."""
        if len(lane.toks) >= self.n_batch // 2:
            self._flush(seq_id, lane)

    def _flush(self, seq_id: int, lane: _Lane, reserve: int = 0) -> int | None:
        """Decode the lane's pending pairs, n_batch at a time; each part leaves `pending` once it is in the KV.
        With `reserve`, a last part that leaves room for that many entries stays in the batch undecoded: the
        caller adds its own, decodes, and commits the returned count. None: no room (the rest stays pending)."""
        b = self._batch
        b.n = 0
        while lane.toks:
            take = min(len(lane.toks), b.cap)
            b.add(seq_id, lane.toks[:take], lane.kv_end, lane.hs[:take])
            if reserve and take == len(lane.toks) and take + reserve <= b.cap:
                return take
            if not self._decode_for(seq_id, lane):
                return None
            self._commit(lane, take)
        return 0

    @staticmethod
    def _commit(lane: _Lane, n: int) -> None:
        """The first n pending pairs are in the KV now."""
        lane.kv_end += n
        del lane.toks[:n], lane.hs[:n]

    def _decode_for(self, seq_id: int, lane: _Lane) -> bool:
        """Decode the batch (then empty); False when the KV has no room (llama.cpp changed nothing). Another
        failure may leave part of the batch in the KV: the lane starts over cold and the error goes on."""
        b = self._batch
        rc = b.decode(self._ctx)
        b.n = 0
        if rc == 1:
            self.no_room += 1
            return False
        if rc != 0:
            self._reset(seq_id, lane)
            raise EngineError(f"the MTP context's llama_decode failed with code {rc}")
        return True

    def _argmax(self, idx: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, idx), shape=(self.n_vocab,))))

    def _row(self, idx: int) -> np.ndarray:
        return np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(self._ctx, idx), shape=(self.n_embd,)).copy()
