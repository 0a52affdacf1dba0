"""Continuous batching (engine/batch.py, slots.py) on real llama.cpp with the tiny GLM fixture: several
sequences in one context and one llama_decode per step, each getting exactly its solo tokens where the
kernels allow it, prefix reuse across sequences (seq_cp), a full KV pool handled by preemption, the queue
beyond `parallel`, cancellation of one sequence, and the speculative verification path with test drafters.

Token identity solo vs batched: llama.cpp's CPU kernels are not bit-for-bit batch-shape invariant. Logits of
the same sequence decoded alone or beside others differ by up to ~3e-4 on the F32 copy of the fixture with flash
attention off (~2e-3 with it on: its kernel accumulates over the KV cells in blocks, and the cells of a
sequence sharing a unified pool with others, or rolled back after rejected drafts, are laid out differently),
~0.03 in BF16 and ~0.1-0.2 in Q4_K (1-row and n-row matmuls take other code paths). A greedy pick flips only
where two logits are closer than that. So the strict tests run the F32 copy with flash attention off and first
check that the solo runs they compare against have no near-tie (every top-2 margin > 1e-3): then the batched
tokens must be identical. On BF16 / Q4_K the test asserts complete answers, identity up to the first
divergence, and that every divergence is such a near-tie (the solo margin is below the drift between runs).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import llama_cpp.llama_cpp as C
import numpy as np
import pytest

from glmlocal.engine.budget import ThinkBudget
from glmlocal.engine.engine import CacheConfig, Engine
from glmlocal.engine.generation import Sampling
from glmlocal.engine.hooks import Speculation
from glmlocal.engine.slots import Slot, choose_reuse
from glmlocal.errors import EngineError, InputError
from glmlocal.plan.planner import Placement

GREEDY = Sampling(temperature=0)


F32_NOISE = 1e-3  # F32, flash attention off: a greedy pick with a larger margin cannot flip (drift seen: 3e-4)


def _placement(ctx: int = 2048, batch: int = 32, flash_attn: bool = False) -> Placement:
    return replace(Placement.cpu_only(ctx=ctx, threads=1), n_batch=batch, n_ubatch=batch, flash_attn=flash_attn)


@pytest.fixture(scope="module")
def f32(f32_gguf_factory):
    return f32_gguf_factory("tiny")


@pytest.fixture(scope="module")
def eng(f32):
    # n_batch 32: every prompt here is evaluated in chunks, interleaved with the other sequences' decoding
    with Engine.load(f32, _placement(), parallel=4, cache=CacheConfig(min_tokens=16)) as e:
        yield e


def _no_eog(eng: Engine, s: Sampling = GREEDY) -> Sampling:
    return replace(s, logit_bias={t: float("-inf") for t in eng.eog_ids})


def _prompts(eng: Engine, n: int, seed: int = 0, base: int = 20, step: int = 37) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    head = eng.tokenize("[gMASK]<sop><|user|>\n")
    return [head + [int(t) for t in rng.integers(0, 2900, base + step * i)] for i in range(n)]


def _tokens(outs) -> list[int]:
    return [o.token for o in outs if o.token is not None]


def _solo(eng: Engine, prompts, *, strict: bool = True, **kw) -> list[list]:
    """Each prompt alone on a cold engine. strict: the runs are references for token identity, so check that
    no greedy pick in them is a near-tie that batch-shape noise could flip (else choose other prompts)."""
    res, sampling, logits = [], kw.pop("sampling", GREEDY), strict or kw.pop("want_logits", False)
    for p in prompts:
        eng.reset()  # cold: no reuse from the previous prompt
        res.append(list(eng.generate(p, sampling, want_logits=logits, **kw)))
    if strict and sampling.temperature <= 0:
        for outs in res:
            for o in outs:
                row = o.logits.copy()  # what the sampler saw: the request's logit_bias applied (a banned EOG
                for t, b in sampling.logit_bias.items():  # token can be the raw top-1)
                    row[t] += b
                top2 = np.sort(row)[-2:]
                assert top2[1] - top2[0] > F32_NOISE, "a near-tie in a reference run: pick other prompts"
    return res


def _together(eng: Engine, prompts, kws=None) -> list[list]:
    """Each prompt read on its own thread, as the server's jobs do. All are queued before the decode thread takes
    any of them (it is held between two steps until they are), so how fast the threads start decides nothing."""
    kws = kws or [{}] * len(prompts)
    gens = [eng.generate(p, kw.pop("sampling", GREEDY), **kw) for p, kw in zip(prompts, [dict(k) for k in kws])]
    gate, held = threading.Event(), threading.Event()
    hold = threading.Thread(target=lambda: eng._loop.call(lambda: (held.set(), gate.wait(30))))
    hold.start()
    assert held.wait(30)
    with ThreadPoolExecutor(len(gens)) as pool:
        futures = [pool.submit(list, g) for g in gens]
        deadline = time.monotonic() + 30
        while len(eng._loop._inbox) < len(gens) and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.set()
        hold.join()
        return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------- pure
def test_choose_reuse_prefers_own_kv_then_copy_then_stash():
    p = [1, 2, 3, 4, 5, 6]
    s = lambda toks, busy=False, used=0: Slot(0, list(toks), busy, used)  # noqa: E731
    cases = [  # (slots, stash (key, n), expected (slot, source, n, copied from))
        ([s([]), s([])], (None, 0), (0, "none", 0, None)),
        ([s([1, 2, 3, 9]), s([])], (None, 0), (0, "live", 3, None)),
        ([s([1, 9, 9, 9, 9]), s([])], (None, 0), (1, "copy", 1, 0)),  # little in common: copied, slot 0 kept
        ([s([1, 9, 9, 9, 9])], (None, 0), (0, "live", 1, None)),  # no empty slot: continue the idle one
        ([s([1, 2, 9], used=1), s([1, 2, 3, 4], busy=True), s([7], used=0)], (None, 0), (2, "copy", 4, 1)),
        ([s([1, 2, 3, 4]), s([1, 2, 3, 4, 9], busy=True)], (None, 0), (0, "live", 4, None)),  # tie: own KV
        ([s([1]), s([])], (7, 5), (1, "stash", 5, None)),
        ([s([1, 2, 3, 4, 5, 6, 7])], (7, 6), (0, "live", 5, None)),  # the last prompt token is always evaluated
        ([s([9], used=3), s([8], used=1)], (None, 0), (1, "none", 0, None)),  # least recently used goes
    ]
    for slots, stash, (slot, source, n, src) in cases:
        for i, sl in enumerate(slots):
            sl.seq_id = i
        r = choose_reuse(p, slots, stash)
        assert (r.slot, r.source, r.n, r.src) == (slot, source, n, src), (slots, r)
        assert r.stash_key == (stash[0] if source == "stash" else None)


# --------------------------------------------------------------------------------------------- identity
def test_concurrent_greedy_sequences_equal_their_solo_runs(eng):
    prompts = _prompts(eng, 4)
    solo = _solo(eng, prompts, max_tokens=40)
    eng.reset()
    s0, n0 = eng.decode_steps
    together = _together(eng, prompts, [{"max_tokens": 40}] * 4)
    assert [_tokens(o) for o in together] == [_tokens(o) for o in solo]
    for outs in together:  # complete answers: ended by EOG or the limit, text as a solo run gives it
        assert outs[-1].finish_reason in ("stop", "length") and outs[-1].stats.completion_tokens == len(outs)
    assert [("".join(o.text for o in x)) for x in together] == [("".join(o.text for o in x)) for x in solo]
    steps, seqs = eng.decode_steps
    assert (seqs - n0) / (steps - s0) > 2  # sequences per llama_decode: they shared batches


@pytest.mark.parametrize("quant,noise", [("bf16", 0.1), ("q4_k_m", 0.5)])
def test_bf16_and_q4_answers_are_complete_and_any_divergence_is_a_near_tie(gguf_factory, quant, noise):
    with Engine.load(gguf_factory("tiny", quant), _placement(batch=64), parallel=4,
                     cache=CacheConfig(max_entries=0)) as e:
        prompts = _prompts(e, 4, seed=1)
        solo = _solo(e, prompts, strict=False, max_tokens=30, want_logits=True)
        e.reset()
        together = _together(e, prompts, [{"max_tokens": 30, "want_logits": True}] * 4)
    identical = 0
    for a, b in zip(solo, together):
        assert b[-1].finish_reason in ("stop", "length") and b[-1].stats.completion_tokens == len(b)
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x.token != y.token), None)
        if j is None:
            identical += 1
            continue
        drift = max(np.abs(a[i].logits - b[i].logits).max() for i in range(j + 1))
        la = a[j].logits
        assert drift < noise  # the same computation, rounded differently by 1-row and n-row kernels
        # a flip needs the solo margin within the two runs' drifts on both tokens: margin <= 2 * drift
        assert la[a[j].token] - la[b[j].token] <= 2 * drift
    assert identical >= 1


# --------------------------------------------------------------------------------------------- cancellation
def test_cancelling_one_sequence_leaves_the_others_unchanged(eng):
    prompts = _prompts(eng, 3, seed=2)
    solo = _solo(eng, prompts, sampling=_no_eog(eng), max_tokens=30)
    eng.reset()
    cancel = threading.Event()
    gens = [eng.generate(p, _no_eog(eng), max_tokens=30, cancel=cancel if i == 1 else None)
            for i, p in enumerate(prompts)]
    got: list[list] = [[], [], []]

    def read(i):
        for out in gens[i]:
            got[i].append(out)
            if i == 1 and len(got[i]) == 5:
                cancel.set()
            if i == 2 and len(got[i]) == 3:
                gens[i].close()  # the reader leaves (a client disconnecting)
                return

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(read, range(3)))
    assert _tokens(got[0]) == _tokens(solo[0])
    assert got[1][-1].finish_reason == "cancelled" and _tokens(got[1]) == _tokens(solo[1])[:5]
    assert _tokens(got[2]) == _tokens(solo[2])[:3]
    again = list(eng.generate(prompts[0], _no_eog(eng), max_tokens=30))  # the engine goes on, the KV intact
    st = again[-1].stats
    assert _tokens(again) == _tokens(solo[0]) and (st.cache_source, st.cached_tokens) == ("copy", len(prompts[0]) - 1)


# --------------------------------------------------------------------------------------------- prefix reuse
def test_a_new_prompt_shares_a_running_sequences_prefix(eng):
    long, other = _prompts(eng, 2, seed=3, base=90)
    second = long[:80] + other[10:30]
    eng.reset()
    cold = list(eng.generate(second, GREEDY, max_tokens=10))
    eng.reset()
    first = eng.generate(long, _no_eog(eng), max_tokens=200)
    next(first)  # running now: its prompt's KV is in its slot
    warm = list(eng.generate(second, GREEDY, max_tokens=10))
    first.close()
    st = warm[-1].stats
    assert (st.cache_source, st.cached_tokens) == ("copy", 80)  # llama_memory_seq_cp, not recomputed
    assert _tokens(warm) == _tokens(cold)


def test_idle_slots_keep_each_conversation(eng):
    eng.reset()
    a, b = _prompts(eng, 2, seed=4, base=60)
    out_a = _tokens(list(eng.generate(a, GREEDY, max_tokens=4)))
    st_b = list(eng.generate(b, GREEDY, max_tokens=4))[-1].stats
    assert (st_b.cache_source, st_b.cached_tokens) == ("copy", 4)  # the chat template's head, shared with a
    follow = list(eng.generate(a + out_a + b[5:10], GREEDY, max_tokens=4))
    st = follow[-1].stats
    assert st.cache_source == "live" and st.cached_tokens == len(a) + len(out_a) - 1  # its own idle slot
    assert len(eng.state_cache) == 0  # nothing had to be stashed: four slots


# --------------------------------------------------------------------------------------------- full pool, queue
def test_a_full_kv_pool_preempts_without_losing_work(f32):
    with Engine.load(f32, _placement(ctx=256), parallel=3, cache=CacheConfig(max_entries=0)) as e:
        prompts = _prompts(e, 3, seed=5, base=40, step=5)
        solo = _solo(e, prompts, sampling=_no_eog(e), max_tokens=120)  # each fits alone; together they do not
        e.reset()
        together = _together(e, prompts, [{"sampling": _no_eog(e), "max_tokens": 120}] * 3)
    assert [_tokens(o) for o in together] == [_tokens(o) for o in solo]
    assert all(o[-1].finish_reason == "length" for o in together)
    assert sum(o[-1].stats.preempted for o in together) >= 1


def test_requests_beyond_parallel_wait_their_turn(f32):
    with Engine.load(f32, _placement(), parallel=2) as e:
        a, b, c = _prompts(e, 3, seed=6)
        held = [e.generate(p, _no_eog(e), max_tokens=200) for p in (a, b)]
        for g in held:
            next(g)  # unread streams hold their slots
        done = threading.Event()
        t = threading.Thread(target=lambda: (list(e.generate(c, GREEDY, max_tokens=3)), done.set()))
        t.start()
        time.sleep(0.5)
        assert not done.is_set()
        held[0].close()
        t.join(30)
        assert done.is_set()
        held[1].close()


# --------------------------------------------------------------------------------------------- speculation
class Replay:
    """Drafts the known greedy continuation of each prompt (every draft is accepted)."""

    def __init__(self, runs: dict[tuple[int, ...], list[int]], wrong: bool = False):
        self.runs, self.wrong, self.accepted, self.resets = runs, wrong, [], 0

    def draft(self, seq, n_max):
        gen = list(seq.history[seq.n_prompt:])
        cont = self.runs[tuple(seq.history[:seq.n_prompt])][len(gen):len(gen) + n_max]
        return [(t + 1) % 2900 if self.wrong else t for t in cont]

    def on_accept(self, seq, tokens, n_drafted, n_accepted):
        self.accepted.append((n_drafted, n_accepted))

    def reset(self, seq):
        self.resets += 1


@pytest.mark.parametrize("wrong", [False, True])
def test_drafts_are_verified_in_the_shared_batch(eng, wrong):
    prompts = _prompts(eng, 3, seed=7)
    solo = _solo(eng, prompts, sampling=_no_eog(eng), max_tokens=25)
    drafter = Replay({tuple(p): _tokens(o) for p, o in zip(prompts, solo)}, wrong=wrong)
    eng.reset()
    kws = [{"sampling": _no_eog(eng), "max_tokens": 25, "spec": Speculation(drafter, 4)}] * 2
    together = _together(eng, prompts, kws + [{"sampling": _no_eog(eng), "max_tokens": 25}])
    assert [_tokens(o) for o in together] == [_tokens(o) for o in solo]  # greedy: exactly plain decoding
    for outs in together[:2]:
        st = outs[-1].stats
        assert st.draft_n > 0 and st.completion_tokens == 25
        assert st.draft_n_accepted == (0 if wrong else st.draft_n)
    if not wrong:  # 1 + 4 tokens a step, the last step clipped to what max_tokens leaves
        assert together[0][-1].stats.draft_n == 19  # 4 steps of 4 drafts, then the 3 that max_tokens leaves
    assert drafter.resets == 2 and all(n <= 4 for n, _ in drafter.accepted)


def test_after_rejected_drafts_the_cached_prefix_is_exact(eng):
    prompt = _prompts(eng, 1, seed=8)[0]
    plain = _solo(eng, [prompt], sampling=_no_eog(eng), max_tokens=20)[0]
    eng.reset()
    spec = Speculation(Replay({tuple(prompt): _tokens(plain)}, wrong=True), 3)
    outs = list(eng.generate(prompt, _no_eog(eng), max_tokens=20, spec=spec))
    follow = prompt + _tokens(outs) + prompt[3:9]
    warm = list(eng.generate(follow, GREEDY, max_tokens=5, want_logits=True))
    eng.reset()
    cold = list(eng.generate(follow, GREEDY, max_tokens=5, want_logits=True))
    assert warm[-1].stats.cached_tokens == len(prompt) + 19 and cold[-1].stats.cached_tokens == 0
    # the same KV, laid out in other cells after the rollbacks: equal to rounding (a KV entry left from a rejected
    # draft, or one missing, would move these logits by whole units)
    np.testing.assert_allclose(np.stack([o.logits for o in warm]), np.stack([o.logits for o in cold]), atol=1e-4)
    assert [o.token for o in warm] == [o.token for o in cold]


def test_drafts_stop_at_end_of_generation_and_grammars_hold(eng):
    prompt = _prompts(eng, 1, seed=9)[0]
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    plain = _solo(eng, [prompt], strict=False, sampling=Sampling(seed=1), grammar=grammar, max_tokens=30)[0]
    assert plain[-1].eog
    spec = Speculation(Replay({tuple(prompt): _tokens(plain)}), 8)
    eng.reset()
    outs = list(eng.generate(prompt, Sampling(seed=1), grammar=grammar, max_tokens=30, spec=spec))
    assert _tokens(outs) == _tokens(plain) and outs[-1].eog and outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) in ("The answer is yes.", "The answer is no.")


# --------------------------------------------------------------------------------------------- budgets, hooks
def test_each_sequence_keeps_its_own_thinking_budget(eng):
    open_id, close_id = eng.token_id("<think>"), eng.token_id("</think>")
    prompt = eng.tokenize("[gMASK]<sop><|user|>\nThink hard.<|assistant|><think>")
    kws = [{"sampling": _no_eog(eng, Sampling(seed=s)), "max_tokens": 20,
            "think": ThinkBudget(open_id, close_id, b, starts_inside=True)} for s, b in ((1, 3), (2, 7), (3, 12))]
    for outs, budget in zip(_together(eng, [prompt] * 3, kws), (3, 7, 12)):
        assert [o.thinking for o in outs] == [True] * budget + [False] * (20 - budget)
        assert outs[budget - 1].token == close_id and open_id not in _tokens(outs)[budget:]


class Recorder:
    """A KvMirror and a DecodeObserver that check what the loop tells them against the main context."""

    def __init__(self):
        self.ops, self.rows, self.bad = [], 0, []

    def after_decode(self, ctx, rows):
        mem = C.llama_get_memory(ctx)
        for r in rows:
            self.rows += 1
            if C.llama_memory_seq_pos_max(mem, r.seq_id) != r.pos0 + len(r.tokens) - 1:
                self.bad.append(r)

    def seq_rm(self, seq_id, p0, p1):
        self.ops.append(("rm", seq_id, p0, p1))

    def seq_cp(self, src, dst, p0, p1):
        self.ops.append(("cp", src, dst, p0, p1))

    def clear(self):
        self.ops.append(("clear",))

    def save(self, seq_id):
        return None

    def restore(self, seq_id, blob):
        return True


def test_hooks_see_every_decode_and_every_kv_operation(f32):
    with Engine.load(f32, _placement(), parallel=2) as e:
        rec = Recorder()
        e.add_decode_observer(rec)
        e.add_kv_mirror(rec)
        prompt = _prompts(e, 1, seed=10)[0]
        plain = list(e.generate(prompt + [5], _no_eog(e), max_tokens=12))
        spec = Speculation(Replay({tuple(prompt + [5]): _tokens(plain)}, wrong=True), 2)
        list(e.generate(prompt + [5], _no_eog(e), max_tokens=6, spec=spec))
    assert rec.rows > 12 and not rec.bad
    rollbacks = [op for op in rec.ops if op[0] == "rm" and op[3] == -1 and op[2] > len(prompt)]
    assert len(rollbacks) == 4  # every step with drafts threw them away (the last two had no room to draft)


class Faulty:
    """A DecodeObserver that raises `exc` once, at its `at`-th call: after a successful llama_decode, before the
    step's tokens are sampled (the KV already holds them)."""

    def __init__(self, exc: BaseException, at: int):
        self.exc, self.at, self.calls = exc, at, 0

    def after_decode(self, ctx, rows):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc


class Boom(Exception):
    pass


def test_an_error_inside_a_step_ends_its_sequences_and_leaves_no_stale_kv(f32):
    with Engine.load(f32, _placement(), parallel=2) as e:
        prompt = _prompts(e, 1, seed=11)[0]  # one prompt chunk: decode number k emits token k
        e.add_decode_observer(Faulty(Boom("a bug"), at=8))
        got = []
        with pytest.raises(Boom):
            for out in e.generate(prompt, _no_eog(e), max_tokens=30):
                got.append(out.token)
        assert len(got) == 7  # the 8th decode's token (KV written, never sampled) is not in the slot's history
        # the same conversation goes on with other text where the 8th token was: the slot's KV must end where its
        # token list does (a cell left at that position makes llama_decode refuse the batch, or attends to it)
        follow = prompt + got[:6] + _prompts(e, 1, seed=12)[0][5:15]
        warm = list(e.generate(follow, GREEDY, max_tokens=5, want_logits=True))
        assert (warm[-1].stats.cache_source, warm[-1].stats.cached_tokens) == ("live", len(prompt) + 6)
        e.reset()
        cold = list(e.generate(follow, GREEDY, max_tokens=5, want_logits=True))
    np.testing.assert_allclose(np.stack([o.logits for o in warm]), np.stack([o.logits for o in cold]), atol=1e-4)


class Die(BaseException):
    """Not an Exception: the decode loop's catch-all lets it through and the thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_when_the_decode_thread_dies_every_caller_gets_an_error(f32):
    with Engine.load(f32, _placement()) as e:
        prompt = _prompts(e, 1, seed=13)[0]
        e.add_decode_observer(Faulty(Die(), at=3))
        with pytest.raises(EngineError, match="the decode thread has stopped"):
            list(e.generate(prompt, _no_eog(e), max_tokens=30))
        failed: list[BaseException] = []
        calls = [e.reset, lambda: e.cached_prefix(prompt), lambda: list(e.generate(prompt, max_tokens=3))]
        threads = [threading.Thread(target=lambda f=f: _catch(f, failed)) for f in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)  # nothing waits forever for a thread that is gone
        assert len(failed) == 3 and all(isinstance(x, EngineError) for x in failed), failed
        assert all("decode thread has stopped" in str(x) for x in failed)


def _catch(fn, into: list) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - collected for the assertion
        into.append(exc)


def test_bad_parallel_and_closing_with_streams_open(f32):
    with pytest.raises(InputError, match="parallel must be between 1"):
        Engine.load(f32, _placement(), parallel=0)
    with pytest.raises(ValueError, match="n_max must be at least 1"):
        Speculation(Replay({}), 0)
    e = Engine.load(f32, _placement(), parallel=2)
    stream = e.generate(_prompts(e, 1)[0], _no_eog(e), max_tokens=500)
    next(stream)
    e.close()
    with pytest.raises(Exception, match="engine is closed"):
        list(stream)
