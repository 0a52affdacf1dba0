"""One sequence's llama.cpp sampler chain: built from Sampling + grammar, sampled at a batch row, and the
thinking budget's forced and banned tokens (engine/budget.py) applied at that row.

Each running sequence owns one `SamplerChain`, so grammars, penalties and seeded RNGs never mix between
sequences that share a batch. `llama_sampler_sample` accepts the token it picks into the chain; a forced
token is accepted explicitly, so the grammar and penalties advance exactly as if it had been sampled.
"""

from __future__ import annotations

import ctypes

import llama_cpp.llama_cpp as C
import numpy as np

from glmlocal.engine.budget import ThinkState
from glmlocal.engine.generation import Sampling
from glmlocal.errors import EngineError
from glmlocal.llama import log as llama_log


def build_chain(vocab: C.llama_vocab_p, n_vocab: int, s: Sampling,
                grammar: str | None) -> tuple[C.llama_sampler_p_ctypes, C.llama_sampler_p_ctypes | None]:
    """(the chain, its grammar sampler or None). Raises EngineError for a grammar llama.cpp rejects."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    add = lambda smpl: C.llama_sampler_chain_add(chain, smpl)  # noqa: E731
    if s.logit_bias:
        arr = (C.llama_logit_bias * len(s.logit_bias))()
        for i, (tok, bias) in enumerate(s.logit_bias.items()):
            arr[i].token, arr[i].bias = int(tok), float(bias)
        add(C.llama_sampler_init_logit_bias(n_vocab, len(arr), arr))
    gram = None
    if grammar:
        with llama_log.capture_stderr() as err:
            gram = C.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not gram:
            C.llama_sampler_free(chain)
            why = (err[0].strip().splitlines() or ["failed to parse grammar"])[0]
            raise EngineError(f"invalid GBNF grammar: {why}")
        add(gram)  # the chain owns it from here
    if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        add(C.llama_sampler_init_penalties(n_vocab, s.penalty_last_n, s.repeat_penalty,
                                           s.frequency_penalty, s.presence_penalty))
    if s.temperature <= 0:
        add(C.llama_sampler_init_greedy())
        return chain, gram
    if s.top_k > 0:
        add(C.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(C.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0:
        add(C.llama_sampler_init_min_p(s.min_p, 1))
    add(C.llama_sampler_init_temp(s.temperature))
    seed = C.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed) & 0xFFFFFFFF
    add(C.llama_sampler_init_dist(seed))
    return chain, gram


class SamplerChain:
    """A sequence's chain plus its thinking state. Use from the decode thread only; `close()` once."""

    def __init__(self, vocab: C.llama_vocab_p, n_vocab: int, sampling: Sampling, grammar: str | None,
                 think: ThinkState | None):
        self.n_vocab, self.think = n_vocab, think
        self._chain, self._grammar = build_chain(vocab, n_vocab, sampling, grammar)

    def row(self, ctx: C.llama_context_p, idx: int) -> np.ndarray:
        """The logits of batch row `idx` (a view: valid until the next decode)."""
        return np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))

    def pick(self, ctx: C.llama_context_p, idx: int) -> tuple[int, bool]:
        """The token for batch row `idx` and whether it counted as thinking: sampled through the chain, or
        forced by the thinking budget. A forced `</think>` is accepted into the chain unless the grammar
        cannot take it here (llama.cpp aborts on a rejected token): then the step samples. Banned tokens
        get -inf logits first."""
        st = self.think
        tok = st.forced() if st is not None else None
        if tok is not None and self._grammar_allows(tok):
            C.llama_sampler_accept(self._chain, tok)
        else:
            banned = st.banned() if st is not None else ()
            if banned:
                self.row(ctx, idx)[list(banned)] = -np.inf
            tok = C.llama_sampler_sample(self._chain, ctx, idx)
        return tok, st.push(tok) if st is not None else False

    def room(self) -> int | None:
        """Tokens that may be drafted before the thinking budget forces a token (None: no limit)."""
        return self.think.room() if self.think is not None else None

    def _grammar_allows(self, token: int) -> bool:
        if self._grammar is None:
            return True
        data = (C.llama_token_data * 1)(C.llama_token_data(token, 0.0, 0.0))
        arr = C.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
        C.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return data[0].logit != -np.inf

    def __del__(self) -> None:  # a chain built for a stream that was never started
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone already
            pass

    def close(self) -> None:
        if self._chain:
            C.llama_sampler_free(self._chain)
            self._chain = self._grammar = None
