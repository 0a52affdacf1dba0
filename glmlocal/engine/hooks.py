"""What the decode loop (engine/batch.py) offers speculative decoding: the seams a drafter plugs into.

Three hooks, all called on the decode thread, never concurrently:

- `Drafter` (per request, via `Speculation`): before each step the loop asks it for up to `n_max` draft
  tokens for a sequence in decode (`n_max` is already clipped to the sequence's token budget, its thinking
  budget and the context). The loop verifies them in the shared batch (logits at every position, the
  target's own sampler chain at each row in order, stopping at the first disagreement), rolls the rest of
  the KV back with `llama_memory_seq_rm`, and reports the outcome through `on_accept`. `reset` is called
  once when the sequence ends. When the KV pool is full the batch is not decoded and the next step asks
  again from the same state (no `on_accept` in between).
- `DecodeObserver` (per engine): after every successful main `llama_decode`, the batch layout per sequence
  (prompt chunks included), before any row is sampled: what an MTP drafter needs to mirror the main
  context (hidden-state rows are read by batch index; they are overwritten by the next decode).
- `KvMirror` (per engine): every KV operation the loop does on the main context (remove, copy, clear, save,
  restore) is repeated on each mirror with the same arguments, so a second context (MTP) stays in step.
  A mirror's saved blob travels with the main one (stash, preemption) and comes back to its `restore`.

Verification with greedy sampling gives exactly the tokens plain decoding gives where llama.cpp's kernels are
batch-shape invariant (F32 on the CPU); with temperature > 0 each emitted token is a sample of the target's
distribution given the accepted prefix (llama.cpp's common_sampler_sample_and_accept_n).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import llama_cpp.llama_cpp as C

StateBlob = ctypes.Array[ctypes.c_uint8]  # a sequence's KV state, as llama_state_seq_get_data writes it


class DraftSeq(Protocol):
    """A running sequence as a drafter sees it (read-only)."""

    @property
    def key(self) -> int: ...  # unique per generate() call; stable across preemption

    @property
    def seq_id(self) -> int: ...  # its llama.cpp sequence now (a preempted sequence may come back on another)

    @property
    def history(self) -> Sequence[int]: ...  # prompt + generated tokens; while decoding the last is pending

    @property
    def n_prompt(self) -> int: ...

    @property
    def n_past(self) -> int: ...  # tokens whose KV is in the context (history[:n_past])

    @property
    def step(self) -> int: ...  # the decode loop's step being planned (one more than the loop's previous step)

    @property
    def after_prefill(self) -> bool: ...  # the loop's previous step also carried prompt tokens (so was slower)


class Drafter(Protocol):
    def draft(self, seq: DraftSeq, n_max: int) -> list[int]:
        """Up to n_max tokens guessed to follow seq.history (may be empty)."""
        ...

    def on_accept(self, seq: DraftSeq, tokens: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        """After verification: `tokens` were emitted this step (the accepted drafts, then the target's own
        token). The KV now holds history[:n_past]: the pending token and the accepted drafts."""
        ...

    def reset(self, seq: DraftSeq) -> None:
        """The sequence ended (finished, cancelled or failed)."""
        ...


@dataclass(frozen=True)
class Speculation:
    """Drafting for one request: who drafts, and at most how many tokens per step."""

    drafter: Drafter
    n_max: int

    def __post_init__(self) -> None:
        if self.n_max < 1:
            raise ValueError(f"n_max must be at least 1, got {self.n_max}")


@dataclass(frozen=True)
class SeqRows:
    """One sequence's entries in a decoded batch: tokens[i] at position pos0 + i in batch row first_row + i.
    `outputs` are the batch rows with logits. The last `n_draft` tokens are drafts under verification."""

    key: int
    seq_id: int
    pos0: int
    tokens: tuple[int, ...]
    first_row: int
    outputs: tuple[int, ...]
    n_draft: int = 0


class DecodeObserver(Protocol):
    def after_decode(self, ctx: C.llama_context_p, rows: Sequence[SeqRows]) -> None: ...


class KvMirror(Protocol):
    """A second context whose per-sequence KV follows the main one's."""

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None: ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def clear(self) -> None: ...

    def save(self, seq_id: int) -> StateBlob | None: ...

    def restore(self, seq_id: int, blob: StateBlob) -> bool:
        """Load a blob from `save` into the empty sequence. False: it could not (no room); the store then removes
        the sequence on this mirror alone (seq_rm -1, -1), which starts it over from the main one's position."""
        ...
