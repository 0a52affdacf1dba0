"""Speculative decoding on real llama.cpp with the tiny GLM fixtures: greedy output identical to plain decoding for
MTP, n-gram and MTP + n-gram drafts, with a GLM-4.6-style NextN layer (tiny) and a GLM-4.5-style one (tiny45, its
own embed_tokens and shared head); the MTP context's KV checked against one rebuilt from scratch after every
kind of step (accepted and rejected drafts, prefix reuse, stash, several sequences); grammars, thinking budgets,
stop strings and cancellation with drafts in flight.

Strict token identity is asserted on F32 copies of the fixtures, where llama.cpp's CPU kernels give the same rows
whatever the batch shape. On BF16 and Q4_K_M a verification batch of 1 + k rows takes other matmul paths than a
single row (last-bit differences, ~0.02 / ~0.1-0.2 logits), so a greedy near-tie can flip: there the test
asserts identity up to the first divergence and that the divergence is such a near-tie. Random weights make MTP
drafts almost never right; n-gram drafts are (these models loop), and accepted n-gram drafts exercise the MTP
context's catch-up the same way accepted MTP drafts do. tests/test_spec_trained.py has a model whose MTP head
was trained.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import replace

import llama_cpp.llama_cpp as C
import llama_cpp.llama_cpp_ext as X
import numpy as np
import pytest

from glmlocal.engine.budget import ThinkBudget
from glmlocal.engine.engine import CacheConfig, Engine
from glmlocal.engine.generation import Sampling
from glmlocal.engine.hooks import Speculation
from glmlocal.engine.spec import SpecConfig, decide
from glmlocal.errors import EngineError
from glmlocal.plan.planner import Placement

GREEDY = Sampling(temperature=0)


def placement(ctx: int = 2048, batch: int = 64) -> Placement:
    """Flash attention off: with it, F32 logits drift by ~2e-3 between batch shapes (it accumulates over the KV
    cells in blocks, laid out differently after rollbacks), enough to flip a greedy near-tie; without, < 3e-4."""
    return replace(Placement.cpu_only(ctx=ctx, threads=1), n_batch=batch, n_ubatch=batch, flash_attn=False)


def spec_engine(path, mode: str, n_draft: int | None = 3, *, parallel: int = 1, batch: int = 64,
                cache: CacheConfig = CacheConfig(min_tokens=16)) -> Engine:
    setup = decide(SpecConfig(mode, n_draft), has_nextn=True, planned_mtp=True)
    return Engine.load(path, placement(batch=batch), parallel=parallel, spec=setup, cache=cache)


def prompts(eng: Engine, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    head = eng.tokenize("[gMASK]<sop><|user|>\n")
    return [head + [int(t) for t in rng.integers(0, 2900, 20 + 23 * i)] for i in range(n)]


def no_eog(eng: Engine, s: Sampling = GREEDY) -> Sampling:
    return replace(s, logit_bias={t: float("-inf") for t in eng.eog_ids})


def tokens(outs) -> list[int]:
    return [o.token for o in outs if o.token is not None]


class MtpReference:
    """An MTP context rebuilt from scratch for one token history: a fresh main context decodes the history in one
    batch (its NextN rows), a fresh MTP context takes every pair (x_q, h_{q-1}) from q = `start` (0, or where a
    lane restarted cold) and the root (x_P, h_{P-1})."""

    def __init__(self, path):
        mp = C.llama_model_default_params()
        mp.n_gpu_layers, mp.load_mtp = 0, True
        self.model = C.llama_model_load_from_file(str(path).encode(), mp)
        self.n_embd = C.llama_model_n_embd_out(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))

    def _ctx(self, n: int, mtp: bool):
        cp = C.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 2048, n, n, 1, 1
        cp.flash_attn_type = 0
        if mtp:
            cp.ctx_type = C.LLAMA_CONTEXT_TYPE_MTP
        ctx = C.llama_init_from_model(self.model, cp)
        X.llama_set_embeddings_nextn(ctx, True, False)
        return ctx

    def root_logits(self, history: list[int], root: int, start: int = 0) -> np.ndarray:
        n = len(history)
        main, mtp = self._ctx(n + 1, False), self._ctx(n + 1, True)
        try:
            b = C.llama_batch_init(n + 1, 0, 1)
            for i, t in enumerate(history):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, i == n - 1
                b.seq_id[i][0] = 0
            b.n_tokens = n
            assert C.llama_decode(main, b) == 0
            h = np.ctypeslib.as_array(X.llama_get_embeddings_nextn(main), shape=(n, self.n_embd)).copy()
            C.llama_batch_free(b)
            rows = np.vstack([np.zeros((1, self.n_embd), np.float32), h]).astype(np.float32)[start:].copy()
            toks = np.array([*history, root], np.int32)[start:].copy()
            pos = np.arange(start, n + 1, dtype=np.int32)
            m = n + 1 - start
            nseq, seq, out = np.ones(m, np.int32), np.zeros(m, np.int32), np.zeros(m, np.int8)
            out[-1] = 1
            ptr = ctypes.POINTER(C.llama_seq_id)
            seq_ptrs = (ptr * m)(*[ctypes.cast(seq.ctypes.data + 4 * i, ptr) for i in range(m)])
            raw = C.llama_batch(n_tokens=m, token=toks.ctypes.data_as(ctypes.POINTER(C.llama_token)),
                                embd=rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                pos=pos.ctypes.data_as(ctypes.POINTER(C.llama_pos)),
                                n_seq_id=nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                seq_id=ctypes.cast(seq_ptrs, ctypes.POINTER(ptr)),
                                logits=out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))
            assert C.llama_decode(mtp, raw) == 0
            return np.ctypeslib.as_array(C.llama_get_logits_ith(mtp, m - 1), shape=(self.n_vocab,)).copy()
        finally:
            C.llama_free(main)
            C.llama_free(mtp)

    def close(self):
        C.llama_model_free(self.model)


def engine_root_logits(eng: Engine, seq_id: int, history: list[int], root: int) -> np.ndarray:
    """The engine's MTP context drafting from `root` after `history` (which its lane must hold)."""
    mtp = eng.speculator.mtp

    def run():
        assert mtp.position_end(seq_id) == len(history)
        assert mtp.draft(seq_id, root, len(history), 1)
        return mtp.root_logits()

    return eng._loop.call(run)


def check_mtp_kv(eng: Engine, ref: MtpReference, seq_id: int, history: list[int], tol: float = 5e-3, *,
                 cold: bool = False) -> float:
    """The incremental MTP context equals one rebuilt from scratch for `history` (its last token is the root):
    every pair, or with `cold` the pairs from the first one the lane holds (it restarted cold there). F32 rows agree
    to ~1e-3 whatever the batch shapes; a pair off by one position is off by ~0.3-4 (NOTES §5.3)."""
    got = engine_root_logits(eng, seq_id, history[:-1], history[-1])
    start = eng._loop.call(lambda: eng.speculator.mtp.kv_pos_min(seq_id)) if cold else 0
    want = ref.root_logits(history[:-1], history[-1], start)
    diff = float(np.max(np.abs(got - want)))
    assert diff < tol, f"MTP KV differs from a rebuild: max |dlogit| {diff}"
    return diff


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=["tiny", "tiny45"])
def f32(request, f32_gguf_factory):
    return f32_gguf_factory(request.param)


@pytest.fixture(scope="module")
def plain(f32):
    with Engine.load(f32, placement(), cache=CacheConfig(min_tokens=16)) as e:
        yield e


@pytest.fixture(scope="module")
def ref(f32):
    r = MtpReference(f32)
    yield r
    r.close()


def plain_runs(plain: Engine, ps, n: int = 40, **kw) -> list[list[int]]:
    out = []
    for p in ps:
        plain.reset()
        out.append(tokens(plain.generate(p, kw.get("sampling", no_eog(plain)), max_tokens=n,
                                         grammar=kw.get("grammar"))))
    return out


# --------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("mode", ["mtp", "ngram", "mtp+ngram"])
def test_greedy_speculation_equals_plain_decoding_on_f32(f32, plain, ref, mode):
    with spec_engine(f32, mode, 4) as eng:
        ps = prompts(eng, 3, seed=1)
        want = plain_runs(plain, ps, 60)
        drafted = accepted = 0
        for p, w in zip(ps, want):
            eng.reset()
            outs = list(eng.generate(p, no_eog(eng), max_tokens=60))
            assert tokens(outs) == w
            st = outs[-1].stats
            assert 0 <= st.draft_n_accepted <= st.draft_n
            drafted, accepted = drafted + st.draft_n, accepted + st.draft_n_accepted
            if mode != "ngram":
                check_mtp_kv(eng, ref, 0, p + w)
        assert drafted > 0
        if mode != "mtp":  # random weights end up in loops, which copied spans predict
            assert accepted > 0 and eng.speculator.stats["ngram"].accepted > 0


@pytest.mark.parametrize("preset", ["tiny", "tiny45"])
@pytest.mark.parametrize("quant,noise", [("bf16", 0.2), ("q4_k_m", 0.6)])  # twice the drift (test_batch)
def test_bf16_and_q4_speculation_differs_from_plain_only_at_near_ties(gguf_factory, preset, quant, noise):
    path = gguf_factory(preset, quant)
    with Engine.load(path, placement()) as plain:
        ps = prompts(plain, 2, seed=2)
        want = [list(plain.generate(p, no_eog(plain), max_tokens=40, want_logits=True)) for p in ps]
        for mode in ("mtp", "ngram", "mtp+ngram"):
            with spec_engine(path, mode, 4) as eng:
                for p, w in zip(ps, want):
                    got = tokens(eng.generate(p, no_eog(eng), max_tokens=40))
                    bad = next((i for i, (a, b) in enumerate(zip(got, tokens(w))) if a != b), None)
                    if bad is not None:  # a flip must be a near-tie in plain decoding's own logits
                        row = w[bad].logits
                        assert row[w[bad].token] - row[got[bad]] < noise, f"{mode}: diverged at {bad} beyond noise"
                    assert len(got) == 40


def test_mtp_needs_a_nextn_layer_in_the_gguf(gguf_factory):
    setup = decide(SpecConfig("mtp"), has_nextn=True, planned_mtp=True)
    with pytest.raises(EngineError, match="no NextN .MTP. layer") as err:
        Engine.load(gguf_factory("tiny45", "q4_k_m", mtp=False), placement(), spec=setup)
    assert err.value.hint == "use --spec ngram"


# --------------------------------------------------------------------------------------------- continuity
def test_turns_reuse_the_prefix_and_the_mtp_context_follows(f32, plain, ref):
    with spec_engine(f32, "mtp+ngram", 3) as eng:
        p = prompts(eng, 1, seed=3)[0]
        first = tokens(eng.generate(p, no_eog(eng), max_tokens=30))
        follow = p + first + eng.tokenize("<|user|>\nagain<|assistant|>")
        outs = list(eng.generate(follow, no_eog(eng), max_tokens=30))
        assert outs[-1].stats.cached_tokens == len(p) + 29  # the last generated token was pending, never decoded
        assert tokens(outs) == plain_runs(plain, [follow], 30)[0]
        check_mtp_kv(eng, ref, 0, follow + tokens(outs))
        # a turn that shares only part of the history: the slot is cut back, MTP with it
        branch = p[:15] + [7, 8, 9]
        outs = list(eng.generate(branch, no_eog(eng), max_tokens=20))
        assert outs[-1].stats.cached_tokens == 15
        assert tokens(outs) == plain_runs(plain, [branch], 20)[0]


def test_after_rejected_drafts_the_next_turn_sees_an_exact_prefix(f32, ref):
    with spec_engine(f32, "mtp", 3) as eng:
        p = prompts(eng, 1, seed=4)[0]
        outs = list(eng.generate(p, no_eog(eng), max_tokens=20))
        assert outs[-1].stats.draft_n > outs[-1].stats.draft_n_accepted  # drafts were thrown away
        follow = p + tokens(outs) + p[3:9]
        warm = list(eng.generate(follow, GREEDY, max_tokens=5, want_logits=True))
        check_mtp_kv(eng, ref, 0, follow + tokens(warm))
        eng.reset()
        cold = list(eng.generate(follow, GREEDY, max_tokens=5, want_logits=True))
    assert warm[-1].stats.cached_tokens == len(p) + 19 and cold[-1].stats.cached_tokens == 0
    # the same KV in other cells after the rollbacks: equal to rounding (a KV entry left from a rejected draft, or
    # one missing, would move these logits by whole units)
    np.testing.assert_allclose(np.stack([o.logits for o in warm]), np.stack([o.logits for o in cold]), atol=1e-4)


def test_stashed_conversations_carry_their_mtp_state(f32, plain, ref):
    # one slot: every new conversation stashes the previous one (KV in RAM) and restores it when it comes back
    with spec_engine(f32, "mtp+ngram", 3, cache=CacheConfig(min_tokens=8)) as eng:
        a, b = prompts(eng, 2, seed=5)
        out_a = tokens(eng.generate(a, no_eog(eng), max_tokens=20))
        tokens(eng.generate(b, no_eog(eng), max_tokens=20))
        again = a + out_a + [11, 12]
        outs = list(eng.generate(again, no_eog(eng), max_tokens=20))
        assert outs[-1].stats.cache_source == "stash"
        assert tokens(outs) == plain_runs(plain, [again], 20)[0]
        check_mtp_kv(eng, ref, 0, again + tokens(outs))


def test_several_sequences_draft_in_one_batch(f32, plain, ref):
    with spec_engine(f32, "mtp+ngram", 3, parallel=3) as eng:
        ps = prompts(eng, 3, seed=6)
        gens = [eng.generate(p, no_eog(eng), max_tokens=30) for p in ps]
        results: list[list] = [[] for _ in ps]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, list(gens[i]))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [tokens(r) for r in results] == plain_runs(plain, ps, 30)
        assert all(r[-1].stats.draft_n > 0 for r in results)


# --------------------------------------------------------------------------------------------- constraints
def test_grammar_rejects_drafts_it_forbids(f32, plain):
    grammar = 'root ::= "<tool_call>" [a-z_]{1,12} "\\n<arg_key>city</arg_key>\\n<arg_value>" [A-Za-z ]{1,20} ' \
              '"</arg_value>\\n</tool_call>"'
    with spec_engine(f32, "mtp+ngram", 4) as eng:
        p = prompts(eng, 1, seed=7)[0]
        want = list(plain.generate(p, Sampling(seed=3), grammar=grammar, max_tokens=80))
        got = list(eng.generate(p, Sampling(seed=3), grammar=grammar, max_tokens=80))
        assert tokens(got) == tokens(want) and got[-1].stats.draft_n > 0
        text = "".join(o.text for o in got)
        assert text.startswith("<tool_call>") and text.endswith("</tool_call>")


def test_thinking_budget_is_never_drafted_past(f32, plain):
    open_id, close_id = plain.token_id("<think>"), plain.token_id("</think>")
    p = plain.tokenize("[gMASK]<sop><|user|>\nThink hard.<|assistant|><think>")
    with spec_engine(f32, "ngram", 8) as eng:
        for budget in (2, 9, 17):
            think = ThinkBudget(open_id, close_id, budget, starts_inside=True)
            plain.reset()
            want = list(plain.generate(p, no_eog(plain), max_tokens=30, think=think))
            got = list(eng.generate(p, no_eog(eng), max_tokens=30, think=think))
            assert tokens(got) == tokens(want)
            assert [o.thinking for o in got] == [True] * budget + [False] * (30 - budget)
            assert got[budget - 1].token == close_id


def test_stop_strings_logit_bias_and_cancel_with_drafts(f32, plain):
    with spec_engine(f32, "ngram", 8) as eng:
        p = prompts(eng, 1, seed=8)[0]
        full = "".join(o.text for o in plain.generate(p, no_eog(plain), max_tokens=40))
        stop = full[len(full) // 2:len(full) // 2 + 3]
        outs = list(eng.generate(p, replace(no_eog(eng), stop=(stop,)), max_tokens=40))
        assert outs[-1].finish_reason == "stop" and "".join(o.text for o in outs) == full[:full.index(stop)]
        banned = tokens(plain.generate(p, no_eog(plain), max_tokens=40))[5]
        biased = replace(no_eog(eng), logit_bias={**no_eog(eng).logit_bias, banned: float("-inf")})
        assert banned not in tokens(eng.generate(p, biased, max_tokens=40))
        cancel = threading.Event()
        stream = eng.generate(p, no_eog(eng), max_tokens=200, cancel=cancel)
        seen = [next(stream) for _ in range(5)]
        cancel.set()
        rest = list(stream)
        assert rest[-1].finish_reason == "cancelled" and len(seen) == 5
        again = list(eng.generate(p, no_eog(eng), max_tokens=10))  # the slot is still usable
        assert tokens(again) == tokens(plain.generate(p, no_eog(plain), max_tokens=10))


# --------------------------------------------------------------------------------------------- sampling, auto
def test_sampling_draws_the_same_random_numbers_with_and_without_drafts(f32, plain):
    # Verification samples the target at each drafted position in order and stops at the first disagreement, so
    # every emitted token takes one draw from the sequence's seeded RNG, as in plain decoding: on F32 (same
    # logits whatever the batch shape) a seed gives the same tokens with drafts or without.
    with spec_engine(f32, "mtp+ngram", 4) as eng:
        p = prompts(eng, 1, seed=9)[0]
        for seed in range(6):
            s = Sampling(temperature=0.8, top_k=40, seed=seed)
            plain.reset()
            want = tokens(plain.generate(p, no_eog(plain, s), max_tokens=30))
            outs = list(eng.generate(p, no_eog(eng, s), max_tokens=30))
            assert tokens(outs) == want and outs[-1].stats.draft_n > 0


def test_auto_stops_drafting_what_does_not_pay(gguf_factory):
    # Random weights: MTP drafts are never right, so an MTP step (draft + a wider verification) emits one token
    # for the price of more than one plain step. auto measures that and stops asking MTP after its probes.
    path = gguf_factory("tiny45", "q4_k_m")
    setup = decide(SpecConfig("auto", 3), has_nextn=True, planned_mtp=True)
    with Engine.load(path, placement(), spec=setup) as eng:
        for p in prompts(eng, 2, seed=10):
            outs = list(eng.generate(p, no_eog(eng), max_tokens=150))
            assert len(tokens(outs)) == 150
        sp = eng.speculator
        assert not sp.model.pays("mtp") and not sp.mtp.keep_up
        # 1 draft measured a few times (and afresh after `reprobe` steps); 2 and 3 never: 1 was far too slow
        assert sp.stats["mtp"].steps <= 2 * sp.model.min_samples, sp.model.table()
        assert set(sp.model.table()) >= {"off", "mtp<=1"} and "mtp<=2" not in sp.model.table()
        assert sp.model.rate(("off", 0)) is not None


def test_dormant_mtp_costs_nothing_and_restarts_cold(f32, plain):
    with spec_engine(f32, "mtp", 2) as eng:
        mtp = eng.speculator.mtp
        p = prompts(eng, 1, seed=11)[0]
        eng._loop.call(lambda: setattr(mtp, "keep_up", False))
        first = list(eng.generate(p, no_eog(eng), max_tokens=20))
        assert first[-1].stats.draft_n == 0 and mtp.kv_pos_max(0) == -1  # no drafts, no MTP KV
        eng._loop.call(lambda: setattr(mtp, "keep_up", True))
        follow = p + tokens(first) + [3, 4]
        outs = list(eng.generate(follow, no_eog(eng), max_tokens=20))
        assert outs[-1].stats.draft_n > 0 and outs[-1].stats.cached_tokens == len(p) + 19
        assert tokens(outs) == plain_runs(plain, [follow], 20)[0]
        # the lane restarted after the cached prefix: its MTP KV starts there, and follows the main one
        assert eng._loop.call(lambda: mtp.position_end(0)) == len(follow) + 19


# --------------------------------------------------------------------------------------------- a full KV pool
F32_NOISE = 1e-3  # F32 without flash attention: logits drift by < 3e-4 between batch shapes (tests/test_batch.py)


def top2_margin(logits: np.ndarray, banned=()) -> float:
    """How far the greedy pick beat the runner-up, among the tokens not banned (-inf logit_bias)."""
    row = logits.copy()
    row[list(banned)] = -np.inf
    a, b = np.sort(row)[-2:]
    return float(b - a)


def slot_holding(eng: Engine, history: list[int]) -> int:
    """The seq id of the slot whose KV holds exactly `history`."""
    return next(s.seq_id for s in eng._slots.slots if s.tokens == history)


def together_from_one_step(eng: Engine, gens) -> list:
    """Read each stream on its own thread, all of them queued before the decode loop takes the first: the loop is
    held by a blocking call until every request waits in its inbox (deterministic batches, whatever the threads'
    start times). Each result is the stream's TokenOuts, or the exception it raised."""
    started, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=eng._loop.call, args=(lambda: (started.set(), gate.wait(60)),))
    holder.start()
    assert started.wait(60)
    results: list = [None] * len(gens)

    def read(i):
        try:
            results[i] = list(gens[i])
        except Exception as exc:  # noqa: BLE001 - the assertion says which
            results[i] = exc

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(gens))]
    for t in readers:
        t.start()
    while len(eng._loop._inbox) < len(gens):
        threading.Event().wait(0.005)
    gate.set()
    for t in [holder, *readers]:
        t.join(120)
    return results


class ReplayThenMtp:
    """Every other step drafts the known greedy continuation (all accepted: the KV grows 5 tokens a step), the
    other steps ask the engine's MTP context: the MTP KV then holds a draft root and draft pairs on top of what
    the main KV holds, and runs out of room while the main pool still has some."""

    def __init__(self, eng: Engine, runs: dict[tuple[int, ...], list[int]]):
        self.mtp, self.runs, self.steps = eng.speculator.mtp, runs, 0

    def draft(self, seq, n_max):
        self.steps += 1
        if self.steps % 2:
            return self.runs[tuple(seq.history[:seq.n_prompt])][len(seq.history):len(seq.history) + n_max]
        return self.mtp.draft(seq.seq_id, seq.history[-1], seq.n_past, n_max)

    def on_accept(self, seq, tokens, n_drafted, n_accepted):
        pass

    def reset(self, seq):
        pass


def test_a_full_kv_pool_while_mtp_drafts_preempts_and_ends_nothing(f32, ref):
    # Two sequences that do not fit a 256-token pool together. The MTP context's pool is as large as the main one
    # but holds more (draft roots, draft pairs): its llama_decode finds no room first. That skips the draft; the
    # main pool's own overflow preempts a sequence as without MTP, and nothing ends early or goes stale.
    setup = decide(SpecConfig("mtp", 4), has_nextn=True, planned_mtp=True)
    with Engine.load(f32, placement(ctx=256, batch=32), parallel=2, spec=setup,
                     cache=CacheConfig(max_entries=0)) as eng:
        rng = np.random.default_rng(4)
        head = eng.tokenize("[gMASK]<sop><|user|>\n")
        ps = [head + [int(t) for t in rng.integers(0, 2900, 40 + 5 * i)] for i in range(2)]
        solo = []
        for p in ps:  # references for token identity: no greedy pick in them is a near-tie
            eng.reset()
            outs = list(eng.generate(p, no_eog(eng), max_tokens=150, want_logits=True))
            assert min(top2_margin(o.logits, eng.eog_ids) for o in outs) > F32_NOISE
            solo.append(tokens(outs))
        eng.reset()
        runs = {tuple(p): p + w for p, w in zip(ps, solo)}
        gens = [eng.generate(p, no_eog(eng), max_tokens=150, spec=Speculation(ReplayThenMtp(eng, runs), 4))
                for p in ps]
        results = together_from_one_step(eng, gens)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert [tokens(r) for r in results] == solo
        assert sum(r[-1].stats.preempted for r in results) >= 1
        assert eng.speculator.mtp.no_room > 0  # the MTP context did run out of room first
        # The engine goes on, and each MTP lane left behind is exact: every pair from where it holds any (a lane
        # whose pending pairs found no room when its sequence was preempted restarted cold) to the end.
        held = [(p, w) for p, w in zip(ps, solo) if any(s.tokens == p + w[:-1] for s in eng._slots.slots)]
        assert held
        for p, w in held:
            follow = p + w + [11, 12]
            outs = list(eng.generate(follow, no_eog(eng), max_tokens=20))
            st = outs[-1].stats
            assert outs[-1].finish_reason == "length" and st.draft_n > 0
            assert (st.cache_source, st.cached_tokens) == ("live", len(p) + len(w) - 1)
            hist = follow + tokens(outs)
            check_mtp_kv(eng, ref, slot_holding(eng, hist[:-1]), hist, cold=True)
