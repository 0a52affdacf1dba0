"""The decode loop: several sequences in one llama.cpp context, one `llama_decode` per step, on one thread.

Each step (1) ends sequences whose consumer left or whose cancel event is set, (2) admits waiting requests into
free slots with prefix reuse (engine/slots.py), (3) builds ONE batch: the pending token of every sequence in
decode (plus its draft tokens when speculating, logits at each), then chunks of prompts still being evaluated
up to n_batch tokens in all (logits only at a prompt's last token), so a long prompt never freezes the streams
already running, (4) decodes it, (5) per sequence with logits picks its next token(s) through its own sampler
chain (grammar, penalties, seed, thinking budget), verifies drafts, rolls rejected drafts back with
`llama_memory_seq_rm`, and hands raw `TokenOut`s to the sequence's queue. Text, stop strings and cancellation
as the caller sees them are the consumer's side (engine.Engine.generate), so a consumer that lags behind the
loop still gets exactly the tokens up to the point it stopped.

One shared KV pool (`kv_unified`), not a pool per slot: a single conversation may use the whole context when it
runs alone (an agent's 64K prompt would not fit a quarter of a split pool), a shared prefix copied with
`llama_memory_seq_cp` shares the same cells instead of duplicating them, and idle slots keep their KV for the
next turn until the room is needed (llama-server's slots with --kv-unified work the same way). The price is
that the pool can fill up while several sequences grow: `llama_decode` then returns 1 without changing
anything, and the loop frees room without losing work: idle slots first (stashed in RAM when long enough),
then it preempts the most recently admitted running sequence (its KV saved to RAM with
llama_state_seq_get_data, restored first when a sequence finishes). A lone sequence cannot overflow:
`generate` refuses prompt + max_tokens > n_ctx up front.

Identical results: a sequence's tokens do not depend on what else shares its batch wherever llama.cpp's
kernels are batch-shape invariant (F32 weights on the CPU); bf16 and quantized matmuls round differently
for 1 row and n rows, which can flip a near-tie (tests/test_batch.py says where).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as C

from glmlocal.engine.budget import ThinkBudget
from glmlocal.engine.generation import GenerationStats, Sampling, TokenOut
from glmlocal.engine.hooks import DecodeObserver, SeqRows, Speculation
from glmlocal.engine.llbatch import ArrayBatch
from glmlocal.engine.sampler import SamplerChain
from glmlocal.engine.slots import SeqState, Slot, SlotTable
from glmlocal.errors import EngineError

MAX_AHEAD = 16  # tokens a sequence may run ahead of its reader: an open stream nobody reads holds its slot
IDLE_TICK_S = 0.05  # an idle loop looks again at least this often (a cancel event set elsewhere)
Out = TokenOut | BaseException  # what a sequence's queue carries: raw tokens (no text), or the error that ended it


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    sampling: Sampling
    grammar: str | None
    limit: int  # most tokens to generate
    cancel: threading.Event | None = None
    want_logits: bool = False
    think: ThinkBudget | None = None
    spec: Speculation | None = None


class Seq:
    """One request inside the loop. Built by the consumer (its sampler chain too), then owned by the loop."""

    def __init__(self, key: int, req: Request, chain: SamplerChain):
        self.key, self.req, self.chain = key, req, chain
        self.history = list(req.prompt)  # prompt + generated; KV holds history[:n_past]
        self.n_prompt = len(req.prompt)
        self.out: queue.SimpleQueue[Out] = queue.SimpleQueue()
        self.stats = GenerationStats(prompt_tokens=len(req.prompt))
        self.slot: Slot | None = None
        self.n_gen = 0
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = 0.0
        self.closed = False  # set by the consumer when it stops reading
        self.saved: tuple[list[int], SeqState | None] | None = None  # preempted: its KV in RAM
        self.gate: int | None = None  # preempted at this finish count: wait until a sequence ends
        self.step = -1  # the loop's step its latest drafts were asked for (DraftSeq.step)
        self.after_prefill = False  # that step came after one that carried prompt tokens (DraftSeq)

    @property
    def seq_id(self) -> int:
        return self.slot.seq_id if self.slot is not None else -1

    @property
    def n_past(self) -> int:
        return len(self.slot.tokens) if self.slot is not None else 0

    def cancelled(self) -> bool:
        return self.closed or (self.req.cancel is not None and self.req.cancel.is_set())


@dataclass
class _Work:
    """One sequence's part of the batch being built."""

    seq: Seq
    tokens: list[int]
    pos0: int
    first_row: int
    outputs: list[int] = field(default_factory=list)
    n_draft: int = 0


class _Batch(ArrayBatch):
    """The decode loop's batch: one span per sequence in the step."""

    def add(self, w: _Work, seq_id: int, out_from: int) -> None:
        """Append w's tokens; rows from index `out_from` of the span on get logits."""
        a = self.put(seq_id, w.tokens, w.pos0)
        self.out[a + out_from:self.n] = 1
        w.first_row, w.outputs = a, list(range(a + out_from, self.n))


class BatchLoop:
    """The decode thread. `submit` a Seq, read its `out` queue; `call` runs a function between steps."""

    def __init__(self, ctx: C.llama_context_p, slots: SlotTable, *, n_batch: int, n_ctx: int,
                 eog_ids: frozenset[int]):
        self._ctx, self.slots, self.n_batch, self.n_ctx, self.eog_ids = ctx, slots, n_batch, n_ctx, eog_ids
        self.observers: list[DecodeObserver] = []
        self._batch = _Batch(n_batch)
        self._cv = threading.Condition()
        self._inbox: list[Seq] = []
        self._calls: list[tuple[Callable[[], object], queue.SimpleQueue]] = []
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._stopping = False
        self._dead: str | None = None  # why the decode thread ended unexpectedly (None while it runs)
        self._finished = 0  # sequences ended so far (room came back)
        self.steps = 0  # llama_decode calls
        self._prefilled = False  # the latest planned step carries prompt tokens
        self.seq_steps = 0  # sequences in them, summed (seq_steps / steps: how many shared a step on average)
        self.idle = False  # waiting for readers to catch up
        self._thread = threading.Thread(target=self._main, name="glmlocal-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ other threads
    def _refuse(self) -> None:
        """Raise if the loop takes no more work (called under the lock)."""
        if self._dead is not None:
            raise EngineError(f"the decode thread has stopped ({self._dead})")
        if self._stopping:
            raise EngineError("engine is closed")

    def submit(self, seq: Seq) -> None:
        with self._cv:
            self._refuse()
            self._inbox.append(seq)
            self._cv.notify()

    def call(self, fn: Callable[[], object]) -> object:
        """Run fn on the decode thread between two steps; return its result (or raise its exception)."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        with self._cv:
            self._refuse()
            self._calls.append((fn, box))
            self._cv.notify()
        ok, value = box.get()  # the thread answers every queued call, also when it dies (_main's finally)
        if not ok:
            raise value
        return value

    def wake(self) -> None:
        """A reader caught up (or left): let an idle loop look again."""
        with self._cv:
            self._cv.notify()

    def stop(self) -> None:
        """End the thread; every sequence still queued or running gets EngineError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the decode thread
    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug the step's catch-all lets through: fail everyone, then re-raise
            with self._cv:
                self._dead = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._drain(EngineError(f"the decode thread has stopped ({self._dead})"))
            raise
        self._drain(EngineError("engine is closed"))

    def _drain(self, error: EngineError) -> None:
        """Every sequence still queued or running, and every call still waiting, gets `error`."""
        with self._cv:
            leftover = [*self._inbox, *self._waiting, *self._running]
            self._inbox.clear()
            calls, self._calls = self._calls, []
        for seq in leftover:
            try:
                self._end(seq, error=error)
            except Exception:  # noqa: BLE001 - the others must still get theirs
                seq.out.put(error)
        for _, box in calls:
            box.put((False, error))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self._calls or self._waiting or self._running):
                    self._cv.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                calls, self._calls = self._calls, []
            for fn, box in calls:
                try:
                    box.put((True, fn()))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    box.put((False, exc))
            try:
                worked = self._step()
            except Exception as exc:  # noqa: BLE001 - a bug must not hang every consumer
                self._fail_all(exc)
                worked = True
            if not worked:  # every running sequence waits for its reader: sleep until one reads (or a tick)
                with self._cv:
                    self.idle = not (self._inbox or self._calls or self._stopping)
                    if self.idle:
                        self._cv.wait(IDLE_TICK_S)
                    self.idle = False

    def _step(self) -> bool:
        """One step; False when there was nothing to decode."""
        for seq in [s for s in [*self._waiting, *self._running] if s.cancelled()]:
            self._end(seq, cancelled=True)
        self._admit()
        work = self._plan()
        if not work:
            return False
        rc = self._batch.decode(self._ctx)
        self.steps += 1
        self.seq_steps += len(work)
        if rc == 1:
            self._make_room()
            return True
        if rc != 0:
            for w in work:
                self.slots.kv.seq_rm(w.seq.seq_id, w.seq.n_past, -1)  # keep memory and token lists in step
                self._end(w.seq, error=EngineError(f"llama_decode failed with code {rc}"))
            return True
        if self.observers:
            rows = [SeqRows(w.seq.key, w.seq.seq_id, w.pos0, tuple(w.tokens), w.first_row, tuple(w.outputs),
                            w.n_draft) for w in work]
            for obs in self.observers:
                obs.after_decode(self._ctx, rows)
        for w in work:
            self._advance(w)
        return True

    def _admit(self) -> None:
        while self._waiting and self.slots.has_free():
            seq = self._waiting[0]
            if seq.gate is not None and seq.gate == self._finished and self._running:
                break  # preempted for lack of room, and none has come back yet: everyone behind it waits too
            self._waiting.popleft()
            if seq.saved is not None:
                tokens, state = seq.saved
                seq.slot, seq.saved = self.slots.resume(tokens, state), None
            else:
                seq.slot, source = self.slots.admit(seq.history)
                if seq.n_gen == 0:
                    seq.t_admit = time.perf_counter()
                    st = seq.stats
                    st.cached_tokens, st.cache_source = seq.n_past, source
                    st.queue_s = seq.t_admit - seq.t_submit
            seq.gate = None
            self._running.append(seq)

    def _plan(self) -> list[_Work]:
        """The next batch: decoding sequences first (rotated when n_batch cannot take them all), then prompt
        chunks in admission order."""
        self._batch.n = 0
        budget, work = self.n_batch, []
        decoding = [s for s in self._running if s.n_gen and len(s.history) - s.n_past == 1
                    and s.out.qsize() < MAX_AHEAD]  # a reader that does not keep up holds its sequence back
        if decoding:
            r = self.steps % len(decoding)
            decoding = decoding[r:] + decoding[:r]
        for i, seq in enumerate(decoding):
            if budget < 1:
                break
            seq.step, seq.after_prefill = self.steps, self._prefilled
            drafts = self._drafts(seq, budget - 1 - (len(decoding) - i - 1))
            w = _Work(seq, [seq.history[-1], *drafts], seq.n_past, 0, n_draft=len(drafts))
            self._batch.add(w, seq.seq_id, 0)
            budget -= len(w.tokens)
            work.append(w)
        for seq in self._running:
            if budget < 1:
                break
            if seq.n_gen and len(seq.history) - seq.n_past == 1:
                continue  # decoding (or held back)
            feed = seq.history[seq.n_past:seq.n_past + budget]
            w = _Work(seq, feed, seq.n_past, 0)
            last = seq.n_past + len(feed) == len(seq.history)
            self._batch.add(w, seq.seq_id, len(feed) - 1 if last else len(feed))
            budget -= len(feed)
            work.append(w)
        self._prefilled = any(w.seq not in decoding for w in work)
        return work

    def _drafts(self, seq: Seq, room: int) -> list[int]:
        spec = seq.req.spec
        if spec is None:
            return []
        limits = [spec.n_max, room, seq.req.limit - seq.n_gen - 1, self.n_ctx - seq.n_past - 1]
        think_room = seq.chain.room()
        n_max = min(limits + ([think_room] if think_room is not None else []))
        if n_max < 1:
            return []
        try:
            drafts = [int(t) for t in spec.drafter.draft(seq, n_max)[:n_max]]
        except Exception:  # noqa: BLE001 - drafts only change the speed: this step decodes the sequence without
            return []
        bad = [i for i, t in enumerate(drafts) if not 0 <= t < seq.chain.n_vocab]  # llama_decode would refuse
        return drafts[:bad[0]] if bad else drafts

    def _advance(self, w: _Work) -> None:
        """After the decode: record w's KV, then sample (and verify drafts) where it has logits."""
        seq = w.seq
        if not w.outputs:
            seq.slot.tokens.extend(w.tokens)
            return
        base = len(w.tokens) - w.n_draft
        drafts = w.tokens[base:]
        emitted, ended = [], False
        for j, row in enumerate(w.outputs):
            tok, ended = self._emit(seq, row)
            emitted.append(tok)
            if ended or j >= len(drafts) or tok != drafts[j]:
                break
        keep = base + len(emitted) - 1  # the pending token/prompt chunk plus the drafts confirmed before the last
        seq.slot.tokens.extend(w.tokens[:keep])
        if keep < len(w.tokens):
            self.slots.kv.seq_rm(seq.seq_id, w.pos0 + keep, -1)
        if w.n_draft:
            accepted = sum(1 for t, d in zip(emitted, drafts, strict=False) if t == d)
            seq.stats.draft_n += w.n_draft
            seq.stats.draft_n_accepted += accepted
            seq.req.spec.drafter.on_accept(seq, emitted, w.n_draft, accepted)
        if ended:
            self._end(seq)

    def _emit(self, seq: Seq, row: int) -> tuple[int, bool]:
        """Pick the token at batch row `row`, queue it; (token, whether the sequence is done)."""
        logits = seq.chain.row(self._ctx, row).copy() if seq.req.want_logits else None
        tok, thinking = seq.chain.pick(self._ctx, row)
        seq.history.append(tok)
        seq.n_gen += 1
        st = seq.stats
        st.completion_tokens = seq.n_gen
        if seq.n_gen == 1:
            seq.t_first = time.perf_counter()
            st.ttft_s = st.prompt_s = seq.t_first - seq.t_admit
        eog = tok in self.eog_ids
        reason = "stop" if eog else ("length" if seq.n_gen >= seq.req.limit else None)
        st.decode_s = time.perf_counter() - seq.t_first
        seq.out.put(TokenOut(tok, "", reason, st if reason else None, eog=eog, logits=logits, thinking=thinking))
        return tok, reason is not None

    def _make_room(self) -> None:
        """The pool is full: free idle KV, else preempt the most recently admitted running sequence."""
        if self.slots.evict_idle():
            return
        if len(self._running) > 1:
            seq = self._running.pop()
            if seq.n_gen:
                seq.saved = self.slots.suspend(seq.slot)
            else:  # nothing generated yet: its prompt KV stays an idle slot (stashed if it must go)
                self.slots.release(seq.slot)
            seq.slot, seq.gate = None, self._finished
            seq.stats.preempted += 1
            self._waiting.appendleft(seq)
            return
        seq = self._running[0]
        self._end(seq, error=EngineError(f"the KV cache has no room for sequence {seq.seq_id} "
                                         f"at position {seq.n_past} (context {self.n_ctx})"))

    def _fail_all(self, exc: Exception) -> None:
        """A step raised: every sequence ends with that error. Its decode may have written KV the step never
        recorded, so each running sequence's KV is cut back to its token list first (as after a failed decode)."""
        for seq in [*self._running, *self._waiting]:
            try:
                if seq.slot is not None:
                    self.slots.kv.seq_rm(seq.seq_id, seq.n_past, -1)
            except Exception:  # noqa: BLE001 - the next admission of the slot cuts its KV again (SlotTable.truncate)
                pass
            try:
                self._end(seq, error=exc)
            except Exception:  # noqa: BLE001 - its consumer already has the error; the others must get theirs
                pass

    def _end(self, seq: Seq, *, cancelled: bool = False, error: BaseException | None = None) -> None:
        """The sequence is done: free its slot (its KV stays for the next turn), tell its consumer."""
        if seq in self._running:
            self._running.remove(seq)
            self._finished += 1
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.slot is not None:
            self.slots.release(seq.slot)
        if seq.t_first:
            seq.stats.decode_s = time.perf_counter() - seq.t_first
        if error is not None:
            seq.out.put(error)
        elif cancelled:
            seq.out.put(TokenOut(None, "", "cancelled", seq.stats))
        seq.chain.close()
        if seq.req.spec is not None:
            seq.req.spec.drafter.reset(seq)
