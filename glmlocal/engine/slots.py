"""The KV slots of one context: which llama.cpp sequence holds which tokens, prefix reuse, stashing.

A context has `n_slots` sequences (llama.cpp seq ids 0..n-1) in ONE shared KV pool (kv_unified; see
engine/batch.py for why). A slot is busy while a request runs on it; an idle slot keeps its KV, so the next
turn of that conversation reuses it. A new prompt takes the source with the longest common prefix:

- an idle slot's own KV ("live"): truncate after the common prefix and continue;
- another slot's KV ("copy"), busy or idle: `llama_memory_seq_cp` of the shared prefix into a free slot; in a
  unified pool that adds the free slot's id to the same cells, so nothing is copied or recomputed;
- a stashed conversation ("stash", generation.StateCache in RAM): restored into a free slot.

An idle slot whose content is about to be dropped is stashed first when it is long enough
(CacheConfig.min_tokens). `KvStore` performs every KV operation and repeats it on its mirrors (an MTP
context, engine/hooks.py), saving and restoring their state next to the main one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as C

from glmlocal.engine.generation import StateCache, common_prefix
from glmlocal.engine.hooks import KvMirror, StateBlob


@dataclass(frozen=True)
class CacheConfig:
    """Multi-conversation cache bounds. min_tokens: shorter states are not worth stashing."""

    max_entries: int = 4
    max_bytes: int = 2 << 30
    min_tokens: int = 64


@dataclass
class SeqState:
    """A sequence's saved KV: the main context's bytes and each mirror's (None where a mirror had none)."""

    main: StateBlob
    mirrors: list[StateBlob | None]
    nbytes: int


class KvStore:
    """KV operations on the main context, repeated on every mirror with the same arguments."""

    def __init__(self, ctx: C.llama_context_p):
        self._ctx, self._mem = ctx, C.llama_get_memory(ctx)
        self.mirrors: list[KvMirror] = []

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        ok = bool(C.llama_memory_seq_rm(self._mem, seq, p0, p1))
        for m in self.mirrors:
            m.seq_rm(seq, p0, p1)
        return ok

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        C.llama_memory_seq_cp(self._mem, src, dst, p0, p1)
        for m in self.mirrors:
            m.seq_cp(src, dst, p0, p1)

    def clear(self) -> None:
        C.llama_memory_clear(self._mem, True)
        for m in self.mirrors:
            m.clear()

    def save(self, seq: int, max_bytes: int) -> SeqState | None:
        """The sequence's KV in RAM (None when empty, larger than max_bytes, or llama.cpp refuses)."""
        size = C.llama_state_seq_get_size(self._ctx, seq)
        if not size or size > max_bytes:
            return None
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self._ctx, buf, size, seq)
        if not n:
            return None
        mirrors = [m.save(seq) for m in self.mirrors]
        return SeqState(buf, mirrors, n + sum(len(b) for b in mirrors if b is not None))

    def restore(self, seq: int, state: SeqState) -> bool:
        """Load a saved state into an empty sequence; on failure the sequence is left empty. A mirror that cannot
        restore its part (no blob, or no room: an MTP pool fills up before the main one) starts the sequence over
        on its side, as it does for a sequence it has never seen: the main KV stays."""
        if not C.llama_state_seq_set_data(self._ctx, state.main, len(state.main), seq):
            self.seq_rm(seq, -1, -1)
            return False
        for m, blob in zip(self.mirrors, state.mirrors, strict=False):
            if blob is None or not m.restore(seq, blob):
                m.seq_rm(seq, -1, -1)
        return True


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what its KV holds, positions 0..len-1
    busy: bool = False
    used: int = 0  # admission tick of the last use (least recently used idle slots are evicted first)


@dataclass(frozen=True)
class Reuse:
    """Where a new prompt's reusable prefix comes from: `slot` is the (free) slot it will run on."""

    slot: int
    source: str  # "live" | "copy" | "stash" | "none"
    n: int
    src: int | None = None  # copy: the slot copied from
    stash_key: int | None = None


def choose_reuse(prompt: Sequence[int], slots: Sequence[Slot], stash: tuple[int | None, int]) -> Reuse:
    """The longest reusable prefix of `prompt` (pure). At least the last prompt token is left to evaluate.
    Ties prefer a free slot's own KV, then a copy, then the stash (cheapest first).

    While an empty slot is free, an idle slot is continued in place only when the prompt reuses at least
    half of what it holds (the same conversation, moving on); a shorter common prefix (a shared system prompt)
    is copied into the empty slot instead, so the other conversation keeps its KV."""
    limit = len(prompt) - 1
    free = [i for i, s in enumerate(slots) if not s.busy]
    prefix = {i: min(common_prefix(slots[i].tokens, prompt), limit) for i in range(len(slots))}
    if any(not slots[i].tokens for i in free):
        owners = [i for i in free if slots[i].tokens and 2 * prefix[i] >= len(slots[i].tokens)]
        sources = [i for i, s in enumerate(slots) if s.tokens]
    else:
        owners, sources = free, [i for i, s in enumerate(slots) if s.busy]
    own = max(owners, key=lambda i: (prefix[i], -slots[i].used), default=None)
    own_n = prefix[own] if own is not None else 0
    src = max(sources, key=lambda i: prefix[i], default=None)
    copy_n = prefix[src] if src is not None else 0
    key, stash_n = stash[0], min(stash[1], limit)
    if own is not None and own_n >= max(copy_n, stash_n, 1):
        return Reuse(own, "live", own_n)
    victim = min(free, key=lambda i: (bool(slots[i].tokens), slots[i].used))  # empty first, else LRU
    if copy_n >= max(stash_n, 1):
        return Reuse(victim, "copy", copy_n, src=src)
    if stash_n > 0:
        return Reuse(victim, "stash", stash_n, stash_key=key)
    return Reuse(victim, "none", 0)


class SlotTable:
    """The slots and the stash of one context. Used from the decode thread only."""

    def __init__(self, kv: KvStore, n_slots: int, cache: CacheConfig):
        self.kv, self.cfg = kv, cache
        self.slots = [Slot(i) for i in range(n_slots)]
        self.stash: StateCache[SeqState] = StateCache(cache.max_entries, cache.max_bytes)
        self._tick = 0

    def has_free(self) -> bool:
        return any(not s.busy for s in self.slots)

    def reusable(self, prompt: Sequence[int]) -> int:
        """Prompt tokens admit(prompt) would take from the KV now (with every slot busy: the longest prefix held
        anywhere, which a slot freed later can offer at most)."""
        stash = self.stash.best(prompt)
        if self.has_free():
            return choose_reuse(prompt, self.slots, stash).n
        held = max((common_prefix(s.tokens, prompt) for s in self.slots), default=0)
        return min(max(held, stash[1]), len(prompt) - 1)

    def admit(self, prompt: Sequence[int]) -> tuple[Slot, str]:
        """Claim a free slot holding the longest reusable prefix of prompt; (the slot, the prefix's source).
        The slot's tokens are that prefix (a failed restore leaves less: what is really there)."""
        r = choose_reuse(prompt, self.slots, self.stash.best(prompt))
        slot = self.slots[r.slot]
        if r.source == "live":
            if len(slot.tokens) - r.n >= self.cfg.min_tokens:
                self._stash(slot)
            self.truncate(slot, r.n)
        else:
            taken = self.stash.take(r.stash_key) if r.stash_key is not None else None  # before stashing
            self._evict(slot)
            if r.src is not None:
                src = self.slots[r.src]
                self.kv.seq_cp(src.seq_id, slot.seq_id, 0, r.n)
                slot.tokens = list(src.tokens[: r.n])
            elif taken is not None and self.kv.restore(slot.seq_id, taken[1]):
                slot.tokens = list(taken[0])
                self.truncate(slot, r.n)
        self._claim(slot)
        return slot, (r.source if slot.tokens else "none")

    def resume(self, tokens: Sequence[int], state: SeqState | None) -> Slot:
        """Claim a free slot for a preempted sequence and restore its KV, evicting idle slots while the pool has
        no room for it (a finished sequence's KV stays idle until then); what still fails is recomputed."""
        slot = min((s for s in self.slots if not s.busy), key=lambda s: (bool(s.tokens), s.used))
        self._evict(slot)
        if state is not None:
            while not self.kv.restore(slot.seq_id, state):
                if not self.evict_idle():
                    break
            else:
                slot.tokens = list(tokens)
        self._claim(slot)
        return slot

    def suspend(self, slot: Slot) -> tuple[list[int], SeqState | None]:
        """Save a busy slot's KV to RAM and free its cells (preemption): (its tokens, their state)."""
        tokens, state = slot.tokens, self.kv.save(slot.seq_id, 1 << 62)
        self.kv.seq_rm(slot.seq_id, -1, -1)
        slot.tokens, slot.busy = [], False
        return tokens, state

    def release(self, slot: Slot) -> None:
        """The request on slot ended: its KV stays for the next turn."""
        slot.busy = False

    def truncate(self, slot: Slot, n: int) -> None:
        """Keep the first n tokens' KV (all of it goes if llama.cpp cannot cut the sequence there). Whatever the KV
        holds past them goes too, even past the token list (a step that failed after its decode)."""
        if not self.kv.seq_rm(slot.seq_id, n, -1):
            self.kv.seq_rm(slot.seq_id, -1, -1)
            n = 0
        del slot.tokens[n:]

    def evict_idle(self) -> bool:
        """Free the least recently used idle slot's KV (stashed when long enough); False if none holds any."""
        idle = [s for s in self.slots if not s.busy and s.tokens]
        if not idle:
            return False
        self._evict(min(idle, key=lambda s: s.used))
        return True

    def reset(self) -> None:
        """Drop every idle slot's KV and every stashed state (busy slots are left alone)."""
        if not any(s.busy for s in self.slots):
            self.kv.clear()
        for s in self.slots:
            if not s.busy:
                self.truncate(s, 0)
        self.stash.clear()

    def _claim(self, slot: Slot) -> None:
        self._tick += 1
        slot.busy, slot.used = True, self._tick

    def _evict(self, slot: Slot) -> None:
        if slot.tokens:
            self._stash(slot)
            self.truncate(slot, 0)

    def _stash(self, slot: Slot) -> None:
        if len(slot.tokens) < self.cfg.min_tokens or self.cfg.max_entries <= 0:
            return
        state = self.kv.save(slot.seq_id, self.cfg.max_bytes)
        if state is not None:
            self.stash.put(slot.tokens, state, state.nbytes)
