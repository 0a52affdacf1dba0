"""The engine: llama.cpp through llama-cpp-python's low-level API.

`Engine.load(path, placement, parallel=N)` applies a planner Placement (GPU layers, tensor overrides, split,
KV types, flash attention, threads, mmap, batch sizes) and creates one context with N sequences in one shared
KV pool. A decode thread (engine/batch.py) runs every generation: `generate()` queues a request and returns an
iterator over that sequence's tokens; up to N run at once in the same batches, more wait their turn (FIFO).
Each reuses the KV of the longest common prefix with a slot or a stashed conversation (engine/slots.py), and
stops on every end-of-generation token. Text, stop strings and cancellation are handled here, on the
caller's thread. Placement -> llama.cpp parameters is glmlocal.engine.params.
"""

from __future__ import annotations

import ctypes
import itertools
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import llama_cpp.llama_cpp as C

from glmlocal.engine.batch import BatchLoop, Request, Seq
from glmlocal.engine.budget import ThinkBudget, ThinkState
from glmlocal.engine.generation import (
    GenerationStats,
    Sampling,
    StateCache,
    StopMatcher,
    TokenOut,
    Utf8Stream,
)
from glmlocal.engine.hooks import DecodeObserver, KvMirror, Speculation
from glmlocal.engine.params import (
    MAX_PARALLEL,
    check_fits,
    context_params,
    device_names,
    mtp_context_params,
)
from glmlocal.engine.params import (
    model_params as _model_params,  # Engine.load looks it up here: tests/rpc_child.py patches engine._model_params
)
from glmlocal.engine.sampler import SamplerChain
from glmlocal.engine.slots import CacheConfig, KvStore, SeqState, SlotTable
from glmlocal.engine.spec import SpecSetup, Speculator, start_speculation
from glmlocal.errors import ContextOverflowError, EngineError, InputError
from glmlocal.llama import log as llama_log
from glmlocal.plan.hardware import Hardware
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.placement import Placement
from glmlocal.plan.planner import plan_gguf

__all__ = ["CacheConfig", "Engine", "LoadReport"]

DEFAULT_CTX = 4096  # a placement without a context size
_LOAD_LOCK = threading.Lock()  # llama.cpp's log is global: one load at a time keeps its capture clean
_STATS_FIELDS = [f.name for f in fields(GenerationStats) if f.name not in ("completion_tokens", "decode_s")]


@dataclass
class LoadReport:
    """What llama.cpp actually did: its load log, buffers per kind and buffer type, overridden tensors."""

    log: list[str] = field(default_factory=list)
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)
    overridden: dict[str, str] = field(default_factory=dict)
    load_s: float = 0.0
    devices: list[str] | None = None  # the GPU-type devices llama.cpp was given, in order (None: its default)


class Engine:
    """A loaded model plus one context of `parallel` sequences. Create with `Engine.load`; close with
    `close()` or `with`."""

    def __init__(self, path: Path, model: C.llama_model_p, ctx: C.llama_context_p, placement: Placement,
                 report: LoadReport, keep: list[object], cache: CacheConfig, parallel: int = 1,
                 speculator: Speculator | None = None):
        self._close_lock = threading.Lock()
        self._ctx = self._model = None  # set last: until then close() frees nothing (Engine.load does, on failure)
        try:
            self._start(path, model, ctx, placement, report, keep, cache, parallel, speculator)
        except BaseException:
            if getattr(self, "_loop", None) is not None:
                self._loop.stop()
            raise
        self._model, self._ctx = model, ctx

    def _start(self, path: Path, model: C.llama_model_p, ctx: C.llama_context_p, placement: Placement,
               report: LoadReport, keep: list[object], cache: CacheConfig, parallel: int,
               speculator: Speculator | None) -> None:
        self.path, self.placement, self.report, self.parallel = path, placement, report, parallel
        self.speculator = speculator  # drafts for every request that names no `spec` (engine/spec.py)
        self._keep = keep
        self._vocab = C.llama_model_get_vocab(model)
        self.n_ctx = C.llama_n_ctx(ctx)
        self.n_batch = C.llama_n_batch(ctx)
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self._vocab, t))
        self._pieces: dict[int, bytes] = {}
        self._slots = SlotTable(KvStore(ctx), parallel, cache)
        self._loop = BatchLoop(ctx, self._slots, n_batch=self.n_batch, n_ctx=self.n_ctx, eog_ids=self.eog_ids)
        if speculator is not None and speculator.mtp is not None:  # before any request: both start empty
            self._loop.observers.append(speculator.mtp)
            self._slots.kv.mirrors.append(speculator.mtp)
        self._keys = itertools.count(1)
        self._tls = threading.local()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, placement: Placement | None = None, *, n_ctx: int | None = None,
             progress: Callable[[float], None] | None = None, cache: CacheConfig = CacheConfig(),
             hardware: Hardware | None = None, parallel: int = 1, spec: SpecSetup | None = None) -> Engine:
        """Load a GGUF with a Placement (when None, planned for `hardware`, default: this machine, probed).

        Raises PlanError before loading when the plan does not fit, InputError for a missing or non-GGUF
        file, EngineError when llama.cpp refuses the file or the settings. progress(fraction) is called
        while tensors load. `parallel` sequences run at once, in one KV pool of n_ctx tokens. `spec`
        (engine/spec.py `decide`) turns on speculative decoding: MTP loads the NextN block and a second context.
        """
        if not 1 <= parallel <= MAX_PARALLEL:
            raise InputError(f"parallel must be between 1 and {MAX_PARALLEL}, got {parallel}")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InputError(f"{path} is not a GGUF file")
        if placement is None:
            placement = plan_gguf(path, PlanOptions(ctx=n_ctx), hardware)
        check_fits(placement)
        placement = replace(placement, mtp=bool(spec is not None and spec.mtp))  # the NextN block: only to draft
        want_ctx = int(n_ctx or placement.n_ctx or DEFAULT_CTX)
        keep: list[object] = []
        devices = device_names(placement)
        mp = _model_params(placement, keep, progress, devices)
        cp = context_params(placement, want_ctx, parallel)
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
            try:
                mtp_cp = mtp_context_params(placement, want_ctx, parallel, spec.n_mtp) if placement.mtp else None
                speculator = start_speculation(spec, model, ctx, mtp_cp)
            except BaseException:
                C.llama_free(ctx)
                C.llama_model_free(model)
                raise
        report = LoadReport(log=list(lines), buffers=llama_log.parse_buffers(lines),
                            overridden=llama_log.parse_overrides(lines), load_s=time.perf_counter() - t0,
                            devices=devices)
        try:
            return cls(path, model, ctx, placement, report, keep, cache, parallel, speculator)
        except BaseException:  # nothing owns the model and contexts yet
            if speculator is not None and speculator.mtp is not None:
                speculator.mtp.close()
            C.llama_free(ctx)
            C.llama_model_free(model)
            raise

    def close(self) -> None:
        """Stop the decode thread (whatever still runs ends with EngineError), free the context and the model.
        Idempotent."""
        with self._close_lock:
            if self._ctx:
                self._loop.stop()
                if self.speculator is not None and self.speculator.mtp is not None:
                    self.speculator.mtp.close()
                C.llama_free(self._ctx)
                C.llama_model_free(self._model)
                self._ctx = self._model = None
                self._slots.stash.clear()

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
                 want_logits: bool = False, spec: Speculation | None = None) -> Generator[TokenOut, None, None]:
        """Stream the continuation of prompt_tokens.

        Raises ContextOverflowError (prompt + max_tokens > n_ctx) and EngineError (bad grammar) before
        anything is decoded. The request is queued when the iterator starts; it waits while `parallel`
        others run. Close or exhaust the iterator to end the sequence (its slot is free at the next step).
        max_tokens None fills the context. The last TokenOut has finish_reason and stats. `think` enforces a
        thinking budget (engine/budget.py); each TokenOut says whether its token counted as thinking. `spec`
        drafts tokens to verify in the same batch (engine/hooks.py); None: the engine's speculator's, if any."""
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
        # a grammar is parsed here, once, so a bad one raises before anything is queued; the chain goes with it
        chain = self._chain(sampling, grammar, think) if grammar else None
        limit = room if max_tokens is None else max_tokens
        if spec is None and self.speculator is not None:
            spec = self.speculator.speculation(prompt)
        return self._stream(Request(prompt, sampling, grammar, limit, cancel, want_logits, think, spec), chain)

    def _chain(self, sampling: Sampling, grammar: str | None, think: ThinkBudget | None) -> SamplerChain:
        return SamplerChain(self._vocab, self.n_vocab, sampling, grammar, ThinkState(think) if think else None)

    @property
    def last_stats(self) -> GenerationStats | None:
        """The stats of the latest generation started on the calling thread (kept up to date as its tokens
        are read, final when it ends or is closed)."""
        return getattr(self._tls, "stats", None)

    def _stream(self, req: Request, chain: SamplerChain | None) -> Generator[TokenOut, None, None]:
        # Queued here, not in generate(), so a stream that is never started costs nothing (a grammar's chain,
        # built in generate(), is freed when the stream is collected: SamplerChain.__del__).
        stats = GenerationStats(prompt_tokens=len(req.prompt))
        self._tls.stats = stats
        if req.cancel is not None and req.cancel.is_set():
            if chain is not None:
                chain.close()
            yield TokenOut(None, "", "cancelled", stats)
            return
        chain = chain or self._chain(req.sampling, req.grammar, req.think)
        seq = Seq(next(self._keys), req, chain)
        try:
            self._loop.submit(seq)
        except BaseException:
            chain.close()
            raise
        try:
            yield from self._read(seq, stats)
        finally:
            seq.closed = True  # the loop ends it at its next step, if it is still running
            self._loop.wake()

    def _read(self, seq: Seq, stats: GenerationStats) -> Generator[TokenOut, None, None]:
        """The loop's raw tokens -> TokenOuts with text; stop strings and cancel end the stream here, exactly
        after the last token this consumer read, however far ahead the loop is."""
        text_in, stops, cancel = self.utf8_stream(), StopMatcher(seq.req.sampling.stop), seq.req.cancel
        n = 0
        while True:
            item = self._next(seq)
            if isinstance(item, BaseException):
                raise item
            for name in _STATS_FIELDS:
                setattr(stats, name, getattr(seq.stats, name))
            if item.token is None or (cancel is not None and cancel.is_set()):
                yield self._final(None, _drain(text_in, stops), "cancelled", stats, seq)
                return
            n = stats.completion_tokens = n + 1
            tok, eog = item.token, item.eog  # an end-of-generation token's text is never emitted
            emit, hit = ("", False) if eog else stops.push(text_in.push(tok))
            if hit or item.finish_reason is not None:
                text, reason = (emit, "stop") if hit else (emit + _drain(text_in, stops), item.finish_reason)
                yield self._final(tok, text, reason, stats, seq, eog=eog, item=item)
                return
            yield TokenOut(tok, emit, logits=item.logits, thinking=item.thinking)

    def _next(self, seq: Seq) -> TokenOut | BaseException:
        while True:
            try:
                item = seq.out.get(timeout=1.0)
                if self._loop.idle:
                    self._loop.wake()
                return item
            except queue.Empty:
                if not self._loop.alive:
                    return EngineError("the decode thread has stopped")

    @staticmethod
    def _final(tok: int | None, text: str, reason: str, stats: GenerationStats, seq: Seq, *, eog: bool = False,
               item: TokenOut | None = None) -> TokenOut:
        if seq.t_first:
            stats.decode_s = time.perf_counter() - seq.t_first
        return TokenOut(tok, text, reason, stats, eog=eog, logits=item.logits if item else None,
                        thinking=item.thinking if item else False)

    # ------------------------------------------------------------------ slots, stash, hooks
    @property
    def state_cache(self) -> StateCache[SeqState]:
        """Conversations stashed in RAM (read-only from other threads: the decode thread changes it)."""
        return self._slots.stash

    def cached_prefix(self, prompt_tokens: Sequence[int]) -> int:
        """Prompt tokens a generation started now could take from the KV cache (a slot's, or the stash's), looked
        up on the decode thread between two steps, running nothing: the server reports it before generating."""
        prompt = [int(t) for t in prompt_tokens]
        return int(self._loop.call(lambda: self._slots.reusable(prompt))) if prompt else 0

    @property
    def decode_steps(self) -> tuple[int, int]:
        """(llama_decode calls made so far, sequences in them summed): their ratio is how many sequences
        shared a step on average."""
        return self._loop.steps, self._loop.seq_steps

    def reset(self) -> None:
        """Drop every idle slot's KV and every stashed conversation (running generations go on)."""
        self._loop.call(self._slots.reset)

    def add_decode_observer(self, observer: DecodeObserver) -> None:
        """Call observer.after_decode after every main llama_decode (engine/hooks.py)."""
        self._loop.call(lambda: self._loop.observers.append(observer))

    def add_kv_mirror(self, mirror: KvMirror) -> None:
        """Repeat every KV operation on `mirror` from now on (attach before the first generation, or after
        reset(), so both start empty)."""
        self._loop.call(lambda: self._slots.kv.mirrors.append(mirror))


def _drain(text_in: Utf8Stream, stops: StopMatcher) -> str:
    """Everything still pending at the end of a stream: held-back UTF-8 bytes, then held-back stop text."""
    out, hit = stops.push(text_in.flush())
    return out if hit else out + stops.flush()


def _last_error(lines: list[str]) -> str:
    errs = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return errs[-1] if errs else (lines[-1].strip() if lines else "no details logged")
