"""Thinking budgets, token by token: which generated tokens are thinking, and when the engine must close the block.

Pure state (no llama.cpp), driven by the engine's loop. A budget of N means a turn never spends more than N
generated tokens inside thinking blocks, the tags included: when the block has used N - 1, the next token is
forced to the closing tag (accepted into the sampler chain as if sampled, so a grammar continues after it), and
once the budget is spent the opening tag is banned. So `reasoning_tokens <= N` holds to the token, the way
Anthropic's `budget_tokens` and Qwen's / GLM's "thinking budget" work.

A grammar cannot take the closing tag while a multi-byte UTF-8 character is half written (llama.cpp's grammar
waits for its remaining bytes), and byte-level models do split characters across tokens. So in the last
UTF8_GUARD steps before the forced close, tokens that would start a character they do not finish are banned
too (`char_openers`): a character started earlier is finished by then, and the tag always lands on time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

UTF8_GUARD = 3  # once its first byte is out, a UTF-8 character needs at most 3 more


def opens_char(piece: bytes) -> bool:
    """Whether `piece` ends inside a multi-byte UTF-8 character that it starts itself (its last lead byte is
    followed by fewer continuation bytes than the character needs)."""
    for back in range(1, min(4, len(piece)) + 1):
        b = piece[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: the lead is further back
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return need > back
    return False


def char_openers(n_vocab: int, piece: Callable[[int], bytes]) -> tuple[int, ...]:
    """The tokens of a vocabulary that open a character without finishing it (see `opens_char`)."""
    return tuple(t for t in range(n_vocab) if opens_char(piece(t)))


@dataclass(frozen=True)
class ThinkBudget:
    """What the engine needs to enforce a thinking budget on one generation.

    open_id / close_id: the family's `<think>` / `</think>` tokens. budget: most tokens spent thinking (>= 1; the
    closing tag counts). starts_inside: the prompt already opened the block (GLM-4.7). call_id: `<tool_call>`,
    which also ends reasoning (the parser treats a call inside reasoning as its end); None if not a single token.
    char_openers: the vocabulary's tokens that leave a UTF-8 character unfinished (`char_openers()`), banned in
    the last UTF8_GUARD steps before a forced close.
    """

    open_id: int
    close_id: int
    budget: int | None  # None: count only, never force
    starts_inside: bool = False
    call_id: int | None = None
    char_openers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"a thinking budget must be at least 1 token, got {self.budget}")


class ThinkState:
    """The running count for one sequence. Ask `forced()` before sampling and `banned()` for tokens to mask;
    then `push(token)` the token actually generated; `push` returns whether that token counted as thinking."""

    def __init__(self, spec: ThinkBudget):
        self.spec = spec
        self.inside = spec.starts_inside
        self.spent = 0

    @property
    def exhausted(self) -> bool:
        return self.spec.budget is not None and self.spent >= self.spec.budget

    def forced(self) -> int | None:
        """The token the next step must be (the closing tag), or None to sample normally."""
        b = self.spec.budget
        if self.inside and b is not None and self.spent >= b - 1:
            return self.spec.close_id
        return None

    def banned(self) -> tuple[int, ...]:
        """Tokens the next step must not sample: the opening tag once nothing is left to think with, or inside a
        block (blocks do not nest; a budgeted model that repeats `<think>` would think about nothing); just
        before a forced close, tokens that would leave a character unfinished."""
        if not self.inside:
            spent = self.spec.budget is not None and self.spent >= self.spec.budget - 1
            return (self.spec.open_id,) if spent else ()
        if self.spec.budget is None:
            return ()
        room = self.room()
        openers = self.spec.char_openers if room is not None and 0 < room <= UTF8_GUARD else ()
        return (self.spec.open_id, *openers)

    def room(self) -> int | None:
        """Tokens that may still be generated before the block must be closed (None: no limit). Drafting never
        runs past it, so a forced token is never skipped by a speculative step."""
        if not self.inside or self.spec.budget is None:
            return None
        return max(self.spec.budget - 1 - self.spent, 0)

    def push(self, token: int) -> bool:
        """Record one generated token; True if it was a thinking token (counted against the budget)."""
        if self.inside:
            self.spent += 1
            if token == self.spec.close_id or (self.spec.call_id is not None and token == self.spec.call_id):
                self.inside = False
            return True
        if token == self.spec.open_id:
            self.inside = True
            self.spent += 1
            return True
        return False
