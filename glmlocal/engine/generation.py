"""Pure pieces of generation the engine composes: sampling settings, streamed outputs and stats,
stop-string matching, incremental UTF-8 decoding, the bounded multi-conversation KV state cache, and
`TokenEngine`, what a Session needs of an engine.

Nothing here touches llama.cpp, so all of it is tested with plain tables.
"""

from __future__ import annotations

import codecs
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from glmlocal.engine.budget import ThinkBudget

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Sampling:
    """Sampling settings. Defaults are the GLM model card's: temperature 1.0, top_p 0.95, top_k 40.

    temperature <= 0 means greedy. seed None draws a random seed. stop strings end generation (the
    stop string itself is not emitted). logit_bias maps token id -> additive bias (-inf bans a token).
    """

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    seed: int | None = None
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    stop: tuple[str, ...] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass
class GenerationStats:
    """Numbers for one generate() call. Times in seconds; ttft counts from the start of prompt processing."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (live sequence or the state cache)
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    # "live" (the slot's own KV), "copy" (a running sequence's prefix, shared with llama_memory_seq_cp),
    # "stash" (restored from the state cache) or "none"
    cache_source: str = "none"
    queue_s: float = 0.0  # waiting for a free slot before prompt processing started
    preempted: int = 0  # times the KV pool was full and this sequence was parked in RAM (nothing recomputed)
    draft_n: int = 0  # speculative tokens drafted and verified
    draft_n_accepted: int = 0  # of which the target agreed with

    @property
    def tokens_per_s(self) -> float:
        """Decode speed over the tokens after the first (the first one's time is the prompt's)."""
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_s if self.prompt_s > 0 else 0.0


@dataclass
class TokenOut:
    """One streamed step. `text` is the newly decodable text (may be "" while a UTF-8 sequence or a
    possible stop string is pending). The last item of a stream has `finish_reason` set
    ("stop" | "length" | "cancelled") and `stats`; when generation ended on an end-of-generation token,
    that token is `token` and `eog` is True (its text is never emitted)."""

    token: int | None
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    eog: bool = False
    logits: np.ndarray | None = None  # numpy copy of the raw logits this token was sampled from, when asked for
    thinking: bool = False  # the token counted against the thinking budget (inside a block, its tags included)


class StopMatcher:
    """Holds back only the text that could still become a stop string; `matched` is the one that was hit."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit). The earliest stop string in
        the text wins (the longest one when several start at the same place)."""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [(i, -len(s), s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            at, _, self.matched = min(hits)
            out, self.buf = self.buf[:at], ""
            return out, True
        keep = self._pending_len()
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def _pending_len(self) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), best, -1):
                if self.buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Utf8Stream:
    """Incremental bytes -> str: a multi-byte character split across tokens is emitted once complete."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self._piece(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TokenEngine(Protocol):
    """What a Session and the server's backend need of an engine: glmlocal.engine.engine.Engine, or a
    scripted token stream in tests. `generate` returns a generator: closing it releases the engine."""

    n_ctx: int
    n_vocab: int
    last_stats: GenerationStats | None

    def token_bytes(self, token: int) -> bytes: ...

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]: ...

    def token_id(self, text: str) -> int | None: ...

    def cached_prefix(self, prompt_tokens: Sequence[int]) -> int: ...

    def generate(self, prompt_tokens: Sequence[int], sampling: Sampling | None = None, *,
                 grammar: str | None = None, max_tokens: int | None = None,
                 cancel: threading.Event | None = None, think: ThinkBudget | None = None,
                 want_logits: bool = False) -> Generator[TokenOut, None, None]: ...


Blob = TypeVar("Blob")  # an opaque state blob (the engine's: a ctypes byte array from llama_state_seq_get_data)


@dataclass
class _Entry(Generic[Blob]):
    tokens: tuple[int, ...]
    data: Blob
    nbytes: int


class StateCache(Generic[Blob]):
    """Bounded LRU of saved KV states keyed by the token sequence they hold.

    The engine's slots keep the KV of recent conversations; when one would be dropped (its slot is reused,
    or the KV pool needs the room) a long enough state is stashed here, and a later request whose prompt
    shares a longer prefix with a stashed state restores it. So alternating conversations do not evict
    each other.
    """

    def __init__(self, max_entries: int = 4, max_bytes: int = 2 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[int, _Entry[Blob]] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def best(self, tokens: Sequence[int]) -> tuple[int | None, int]:
        """(key, common prefix length) of the entry sharing the longest prefix with tokens."""
        key, best = None, 0
        for k, e in self._entries.items():
            n = common_prefix(e.tokens, tokens)
            if n > best:
                key, best = k, n
        return key, best

    def put(self, tokens: Sequence[int], data: Blob, nbytes: int) -> bool:
        """Store a state; entries whose tokens are a prefix of it are dominated and dropped."""
        if self.max_entries <= 0 or nbytes > self.max_bytes:
            return False
        tokens = tuple(tokens)
        for k in [k for k, e in self._entries.items() if tokens[: len(e.tokens)] == e.tokens]:
            del self._entries[k]
        self._entries[self._next] = _Entry(tokens, data, nbytes)
        self._next += 1
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
        return True

    def take(self, key: int) -> tuple[tuple[int, ...], Blob]:
        """Remove and return (tokens, data) of an entry (it becomes the live state)."""
        e = self._entries.pop(key)
        return e.tokens, e.data

    def clear(self) -> None:
        self._entries.clear()
