"""The engine: llama.cpp through llama-cpp-python's low-level API.

`Engine.load(path, placement)` applies a planner Placement (GPU layers, tensor overrides, split, KV types,
flash attention, threads, mmap, batch sizes). `generate()` streams `TokenOut`s, reusing the KV cache for the
longest common prefix with the live sequence or with a stashed conversation (`generation.StateCache`), and
stops on every end-of-generation token. One generation runs at a time (a lock); ctypes releases the GIL
inside llama.cpp, so a server can run it in a worker thread. Placement -> llama.cpp parameters is
glmlocal.engine.params.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp.llama_cpp as C
import numpy as np

from glmlocal.engine.budget import ThinkBudget, ThinkState
from glmlocal.engine.generation import (
    GenerationStats,
    Sampling,
    StateCache,
    StopMatcher,
    TokenOut,
    Utf8Stream,
    common_prefix,
)
from glmlocal.engine.params import (
    KV_TYPES,  # noqa: F401 (re-exported: it used to live here)
    check_fits,
    context_params,
    device_names,
)
from glmlocal.engine.params import (
    model_params as _model_params,  # Engine.load looks it up here: tests/rpc_child.py patches engine._model_params
)
from glmlocal.errors import ContextOverflowError, EngineError, InputError
from glmlocal.llama import log as llama_log
from glmlocal.plan.hardware import Hardware
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.placement import Placement
from glmlocal.plan.planner import plan_gguf

_SEQ = 0  # the engine keeps a single live sequence; other conversations live in the StateCache
_LOAD_LOCK = threading.Lock()  # llama.cpp's log is global: one load at a time keeps its capture clean
StateBlob = ctypes.Array[ctypes.c_uint8]  # a sequence's KV state, as llama_state_seq_get_data writes it


@dataclass(frozen=True)
class CacheConfig:
    """Multi-conversation cache bounds. min_tokens: shorter live states are not worth stashing."""

    max_entries: int = 4
    max_bytes: int = 2 << 30
    min_tokens: int = 64


@dataclass
class LoadReport:
    """What llama.cpp actually did: its load log, buffers per kind and buffer type, overridden tensors."""

    log: list[str] = field(default_factory=list)
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)
    overridden: dict[str, str] = field(default_factory=dict)
    load_s: float = 0.0
    devices: list[str] | None = None  # the GPU-type devices llama.cpp was given, in order (None: its default)


class Engine:
    """A loaded model plus one context. Create with `Engine.load`; close with `close()` or `with`."""

    def __init__(self, path: Path, model: C.llama_model_p, ctx: C.llama_context_p, placement: Placement,
                 report: LoadReport, keep: list[object], cache: CacheConfig):
        self.path, self.placement, self.report = path, placement, report
        self._model, self._ctx, self._keep = model, ctx, keep
        self._vocab = C.llama_model_get_vocab(model)
        self._mem = C.llama_get_memory(ctx)
        self.n_ctx = C.llama_n_ctx(ctx)
        self.n_batch = C.llama_n_batch(ctx)
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self._vocab, t))
        self._batch = C.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._live: list[int] = []  # tokens whose KV is in the live sequence, in order
        self._cache_cfg = cache
        self.state_cache: StateCache[StateBlob] = StateCache(cache.max_entries, cache.max_bytes)
        self._lock = threading.Lock()
        self.last_stats: GenerationStats | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, placement: Placement | None = None, *, n_ctx: int | None = None,
             progress: Callable[[float], None] | None = None, cache: CacheConfig = CacheConfig(),
             hardware: Hardware | None = None) -> Engine:
        """Load a GGUF with a Placement (when None, planned for `hardware`, default: this machine, probed).

        Raises PlanError before loading when the plan does not fit, InputError for a missing or non-GGUF
        file, EngineError when llama.cpp refuses the file or the settings. progress(fraction) is called
        while tensors load.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InputError(f"{path} is not a GGUF file")
        if placement is None:
            placement = plan_gguf(path, PlanOptions(ctx=n_ctx), hardware)
        check_fits(placement)
        want_ctx = int(n_ctx or placement.n_ctx or 4096)
        keep: list[object] = []
        devices = device_names(placement)
        mp = _model_params(placement, keep, progress, devices)
        cp = context_params(placement, want_ctx)
        t0 = time.perf_counter()
        with _LOAD_LOCK, llama_log.router().capture() as lines:
            C.llama_backend_init()
            model = C.llama_model_load_from_file(str(path).encode(), mp)
            if not model:
                raise EngineError(f"llama.cpp could not load {path}: {_last_error(lines)}")
            ctx = C.llama_init_from_model(model, cp)
            if not ctx:
                C.llama_model_free(model)
                raise EngineError(f"llama.cpp could not create a context for {path}: {_last_error(lines)}")
        report = LoadReport(log=list(lines), buffers=llama_log.parse_buffers(lines),
                            overridden=llama_log.parse_overrides(lines), load_s=time.perf_counter() - t0,
                            devices=devices)
        return cls(path, model, ctx, placement, report, keep, cache)

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        with self._lock:
            if self._ctx:
                C.llama_batch_free(self._batch)
                C.llama_free(self._ctx)
                C.llama_model_free(self._model)
                self._ctx = self._model = None
                self.state_cache.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 (interpreter shutdown: the libraries may be gone)
            pass

    # ------------------------------------------------------------------ vocabulary
    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent)."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = C.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n >= len(buf):  # snprintf semantics: n is the full length
            buf = ctypes.create_string_buffer(n + 1)
            n = C.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> token ids. Special-token text such as `[gMASK]` or `<|user|>` is parsed by default,
        because GLM templates write them literally."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (C.llama_token * cap)()
        n = C.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
        return list(arr[:n])

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens rendered as their text)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(128)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids -> text (invalid UTF-8 replaced)."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def utf8_stream(self) -> Utf8Stream:
        """An incremental detokenizer: `push(token) -> str` emits only complete characters."""
        return Utf8Stream(self.token_bytes)

    def token_id(self, text: str) -> int | None:
        """The id of a single-token string such as "<|user|>" (None if it is not one token)."""
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_tokens: Sequence[int], sampling: Sampling | None = None, *,
                 grammar: str | None = None, max_tokens: int | None = None,
                 cancel: threading.Event | None = None, think: ThinkBudget | None = None,
                 want_logits: bool = False) -> Generator[TokenOut, None, None]:
        """Stream the continuation of prompt_tokens.

        Raises ContextOverflowError (prompt + max_tokens > n_ctx) and EngineError (bad grammar) before
        anything is decoded. The iterator holds the engine lock while it runs; close or exhaust it to release.
        max_tokens None fills the context. The last TokenOut has finish_reason and stats. `think` enforces a
        thinking budget (engine/budget.py); each TokenOut says whether its token counted as thinking."""
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise InputError("empty prompt")
        if not self._ctx:
            raise EngineError("engine is closed")
        if max_tokens is not None and max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
        room = self.n_ctx - len(prompt)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ContextOverflowError(len(prompt), max_tokens if max_tokens is not None else 1, self.n_ctx)
        sampling = sampling or Sampling()
        think_ids = [] if think is None else [think.open_id, think.close_id, think.call_id]
        # llama.cpp would silently ignore a logit_bias outside the vocabulary
        for what, ids in (("", prompt), ("logit_bias: ", sampling.logit_bias), ("thinking budget: ", think_ids)):
            bad = [t for t in ids if t is not None and not 0 <= t < self.n_vocab]
            if bad:
                raise InputError(f"{what}token id {bad[0]} outside the vocabulary of {self.n_vocab}")
        C.llama_sampler_free(self._sampler(sampling, grammar))  # validate the grammar eagerly
        limit = room if max_tokens is None else max_tokens
        return self._run(prompt, sampling, grammar, limit, cancel, want_logits, think)

    def _run(self, prompt: list[int], sampling: Sampling, grammar: str | None, limit: int,
             cancel: threading.Event | None, want_logits: bool,
             think: ThinkBudget | None) -> Generator[TokenOut, None, None]:
        # Built here, not in generate(), so a stream that is never started leaks nothing.
        sampler = self._sampler(sampling, grammar)
        try:
            with self._lock:
                stats = GenerationStats(prompt_tokens=len(prompt))
                self.last_stats = stats
                t0 = time.perf_counter()
                stats.cached_tokens, stats.cache_source = self._reuse_prefix(prompt)
                if not self._eval(prompt[stats.cached_tokens:], cancel):
                    stats.prompt_s = time.perf_counter() - t0
                    yield TokenOut(None, "", "cancelled", stats)
                    return
                stats.prompt_s = time.perf_counter() - t0
                grammar_smpl = C.llama_sampler_chain_get(sampler, int(bool(sampling.logit_bias))) if grammar else None
                picker = _Picker(self, sampler, ThinkState(think) if think else None, grammar_smpl)
                yield from self._sample_loop(picker, sampling, limit, cancel, want_logits, stats, t0)
        finally:
            C.llama_sampler_free(sampler)

    def _sample_loop(self, picker: _Picker, sampling: Sampling, limit: int,
                     cancel: threading.Event | None, want_logits: bool, stats: GenerationStats,
                     t0: float) -> Generator[TokenOut, None, None]:
        text_in, stops = self.utf8_stream(), StopMatcher(sampling.stop)
        t_first = None
        for i in range(limit):
            if cancel is not None and cancel.is_set():
                yield self._final(None, _drain(text_in, stops), "cancelled", stats, t_first)
                return
            logits = self._logits_copy() if want_logits else None
            tok, thinking = picker.next()
            stats.completion_tokens += 1
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            eog = tok in self.eog_ids  # its text is never emitted
            emit, hit = ("", False) if eog else stops.push(text_in.push(tok))
            if eog or hit or i == limit - 1:
                text, reason = (emit, "stop") if hit else (emit + _drain(text_in, stops), "stop" if eog else "length")
                yield self._final(tok, text, reason, stats, t_first, eog=eog, logits=logits, thinking=thinking)
                return
            yield TokenOut(tok, emit, logits=logits, thinking=thinking)
            self._eval([tok], None)  # the last token is never decoded: the next prompt re-evaluates it

    def _final(self, tok: int | None, text: str, reason: str, stats: GenerationStats, t_first: float | None,
               *, eog: bool = False, logits: np.ndarray | None = None, thinking: bool = False) -> TokenOut:
        if t_first is not None:
            stats.decode_s = time.perf_counter() - t_first
        return TokenOut(tok, text, reason, stats, eog=eog, logits=logits, thinking=thinking)

    def _logits_copy(self) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _sampler(self, s: Sampling, grammar: str | None) -> C.llama_sampler_p_ctypes:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = lambda smpl: C.llama_sampler_chain_add(chain, smpl)
        if s.logit_bias:
            arr = (C.llama_logit_bias * len(s.logit_bias))()
            for i, (tok, bias) in enumerate(s.logit_bias.items()):
                arr[i].token, arr[i].bias = int(tok), float(bias)
            add(C.llama_sampler_init_logit_bias(self.n_vocab, len(arr), arr))
        if grammar:
            with llama_log.capture_stderr() as err:
                g = C.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not g:
                C.llama_sampler_free(chain)
                why = (err[0].strip().splitlines() or ["failed to parse grammar"])[0]
                raise EngineError(f"invalid GBNF grammar: {why}")
            add(g)
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            add(C.llama_sampler_init_penalties(self.n_vocab, s.penalty_last_n, s.repeat_penalty,
                                               s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            add(C.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(C.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(C.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(C.llama_sampler_init_min_p(s.min_p, 1))
        add(C.llama_sampler_init_temp(s.temperature))
        seed = C.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed) & 0xFFFFFFFF
        add(C.llama_sampler_init_dist(seed))
        return chain

    # ------------------------------------------------------------------ KV reuse
    def _reuse_prefix(self, prompt: list[int]) -> tuple[int, str]:
        """Make the live sequence hold the longest reusable prefix of prompt; return (its length, source).
        At least the last prompt token is always re-evaluated, to get its logits."""
        limit = len(prompt) - 1
        live_n = min(common_prefix(self._live, prompt), limit)
        key, stash_n = self.state_cache.best(prompt)
        stash_n = min(stash_n, limit)
        if key is not None and stash_n > live_n:
            tokens, data = self.state_cache.take(key)  # before stashing, which may evict it
            self._stash_live()
            self._restore(tokens, data)
            self._truncate(stash_n)
            source = "stash"
        else:
            if len(self._live) - live_n >= self._cache_cfg.min_tokens:
                self._stash_live()
            self._truncate(live_n)
            source = "live"
        # a failed restore or partial removal leaves less (or nothing) in memory: report what is really there
        n = len(self._live)
        return n, (source if n else "none")

    def _stash_live(self) -> None:
        if len(self._live) < self._cache_cfg.min_tokens or self._cache_cfg.max_entries <= 0:
            return
        size = C.llama_state_seq_get_size(self._ctx, _SEQ)
        if size > self._cache_cfg.max_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self._ctx, buf, size, _SEQ)
        if n:
            self.state_cache.put(self._live, buf, n)

    def _restore(self, tokens: Sequence[int], data: StateBlob) -> None:
        C.llama_memory_seq_rm(self._mem, _SEQ, -1, -1)
        self._live = []
        if not C.llama_state_seq_set_data(self._ctx, data, len(data), _SEQ):
            C.llama_memory_seq_rm(self._mem, _SEQ, -1, -1)
            return
        self._live = list(tokens)

    def _truncate(self, n: int) -> None:
        if n < len(self._live):
            if not C.llama_memory_seq_rm(self._mem, _SEQ, n, -1):
                C.llama_memory_seq_rm(self._mem, _SEQ, -1, -1)
                n = 0
            del self._live[n:]

    def _eval(self, tokens: list[int], cancel: threading.Event | None) -> bool:
        """Decode tokens after the live sequence in n_batch chunks (logits for the last one only).
        Returns False if cancelled between chunks."""
        b = self._batch
        for start in range(0, len(tokens), self.n_batch):
            if cancel is not None and cancel.is_set():
                return False
            chunk = tokens[start:start + self.n_batch]
            pos0 = len(self._live)
            for j, tok in enumerate(chunk):
                b.token[j], b.pos[j], b.n_seq_id[j] = tok, pos0 + j, 1
                b.seq_id[j][0] = _SEQ
                b.logits[j] = 0
            b.logits[len(chunk) - 1] = start + len(chunk) == len(tokens)
            b.n_tokens = len(chunk)
            rc = C.llama_decode(self._ctx, b)
            if rc != 0:
                self._resync()
                raise EngineError(f"llama_decode failed with code {rc} at position {pos0}"
                                  + (" (no KV slot: context full)" if rc == 1 else ""))
            self._live.extend(chunk)
        return True

    def _resync(self) -> None:
        # After a failed decode some ubatches may remain; keep the token list in step with the memory.
        pos_max = C.llama_memory_seq_pos_max(self._mem, _SEQ)
        del self._live[max(pos_max + 1, 0):]

    def reset(self) -> None:
        """Drop the live sequence and every stashed conversation."""
        with self._lock:
            C.llama_memory_clear(self._mem, True)
            self._live = []
            self.state_cache.clear()


class _Picker:
    """The next token: sampled through the chain, or forced by the thinking budget. A forced `</think>` is
    accepted into the chain (grammar and penalties advance as if sampled), unless the grammar cannot take it
    here (llama.cpp aborts on a rejected token): then the step samples. Banned tokens get -inf logits."""

    def __init__(self, engine: Engine, sampler: C.llama_sampler_p_ctypes, state: ThinkState | None,
                 grammar: C.llama_sampler_p_ctypes | None):
        self.engine, self.sampler, self.state, self.grammar = engine, sampler, state, grammar

    def next(self) -> tuple[int, bool]:
        """(token, whether it counted as thinking)."""
        st, ctx = self.state, self.engine._ctx
        tok = st.forced() if st is not None else None
        if tok is not None and self._grammar_allows(tok):
            C.llama_sampler_accept(self.sampler, tok)
        else:
            if st is not None and st.banned():
                logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, -1), shape=(self.engine.n_vocab,))
                logits[list(st.banned())] = -np.inf
            tok = C.llama_sampler_sample(self.sampler, ctx, -1)
        return tok, st.push(tok) if st is not None else False

    def _grammar_allows(self, token: int) -> bool:
        if self.grammar is None:
            return True
        data = (C.llama_token_data * 1)(C.llama_token_data(token, 0.0, 0.0))
        arr = C.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
        C.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return data[0].logit != -np.inf


def _drain(text_in: Utf8Stream, stops: StopMatcher) -> str:
    """Everything still pending at the end of a stream: held-back UTF-8 bytes, then held-back stop text."""
    out, hit = stops.push(text_in.flush())
    return out if hit else out + stops.flush()


def _last_error(lines: list[str]) -> str:
    errs = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return errs[-1] if errs else (lines[-1].strip() if lines else "no details logged")
