"""n-gram drafts (prompt lookup): guess the next tokens by copying what followed the latest earlier occurrence of
the sequence's most recent tokens, in the prompt or in what was generated so far.

Pure Python over token ids, no model. This is llama.cpp's `ngram-simple` (common/speculative.cpp: key = the last
tokens, most recent earlier occurrence, draft = what followed it) with an index instead of a backwards scan, and
the longest match preferred: every occurrence of the last `key_min` tokens is a candidate, the one whose match
extends furthest back (up to `key_max` tokens) wins, the most recent among equals. A continuation is trusted
about as far as its match reaches back (at least `min_draft` tokens): a 3-token match is a phrase seen before
and soon goes its own way, a 16-token one is a copy in progress (llama.cpp's ngram-map-k shrinks a key's
drafts to what was accepted last time; this is the stateless version, and on a CPU, where every drafted token
costs compute, it halves the wasted verification on text that does not repeat). It pays where the output
repeats the input: an agent re-emitting a file it was given with a small edit, quoting, code with repeated
shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NgramConfig:
    """key_min: tokens that must match before anything is drafted; key_max: how far back a match is measured;
    candidates: most recent occurrences examined per draft (bounds the work on a very frequent n-gram);
    min_draft: tokens drafted from the shortest match (a longer match drafts as many tokens as it matched)."""

    key_min: int = 3
    key_max: int = 16
    candidates: int = 64
    min_draft: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.key_min <= self.key_max:
            raise ValueError(f"need 1 <= key_min <= key_max, got {self.key_min}, {self.key_max}")


@dataclass(frozen=True)
class NgramDraft:
    """A continuation found earlier in the history: `tokens` followed an occurrence of the last `match` tokens."""

    tokens: list[int]
    match: int
    source: int  # index in the history where the copied continuation starts


class NgramIndex:
    """Where each `key_min`-gram of one growing history ends. Feed it the same history every time (it only ever
    grows: prompt + generated tokens), and it indexes the new part."""

    def __init__(self, config: NgramConfig = NgramConfig()):
        self.config = config
        self._ends: dict[tuple[int, ...], list[int]] = {}
        self._next = config.key_min  # the next end position to index

    def extend(self, history: Sequence[int]) -> None:
        """Index the part of `history` not indexed yet (find() does this itself; call it early for a long prompt)."""
        # An n-gram ending at e (history[e - k:e]) is a candidate once a token follows it: e <= len - 1. The
        # n-gram ending at len itself is the key being looked up, never its own match.
        k = self.config.key_min
        for e in range(self._next, len(history)):
            self._ends.setdefault(tuple(history[e - k:e]), []).append(e)
        self._next = max(self._next, len(history))

    def find(self, history: Sequence[int], n_max: int) -> NgramDraft | None:
        """Up to n_max tokens that followed the best earlier match of the history's end, as many as the match is
        long (None: no match)."""
        cfg, n = self.config, len(history)
        if n_max < 1 or n <= cfg.key_min:
            return None
        self.extend(history)
        ends = self._ends.get(tuple(history[n - cfg.key_min:]))
        if not ends:
            return None
        best, best_len = -1, 0
        for e in reversed(ends[-cfg.candidates:]):
            length = _match_length(history, e, n, cfg.key_min, cfg.key_max)
            if length > best_len:
                best, best_len = e, length
                if length == cfg.key_max:
                    break
        n_draft = min(n_max, max(cfg.min_draft, best_len))
        return NgramDraft(list(history[best:best + n_draft]), best_len, best)


def _match_length(history: Sequence[int], e: int, n: int, known: int, most: int) -> int:
    """How many tokens before positions e and n agree (at least `known`, which the index already matched)."""
    length = known
    while length < most and e - length > 0 and history[e - length - 1] == history[n - length - 1]:
        length += 1
    return length
