"""The engine on real llama.cpp with the converted tiny GLM fixture: placement applied, end-of-generation
tokens, KV prefix reuse (exact against a cold run), the multi-conversation cache, cancellation, context
overflow, grammar and stop strings, one generation at a time."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from glmlocal.engine.engine import CacheConfig, Engine
from glmlocal.engine.generation import Sampling
from glmlocal.errors import ContextOverflowError, EngineError, InputError, PlanError
from glmlocal.plan.planner import Placement
from quantize.gguf_reader import read_gguf

EOG_TEXTS = ["<|endoftext|>", "<|user|>", "<|observation|>"]
EXPERTS = r"blk\.\d+\.ffn_(up|down|gate)_exps"
GREEDY = Sampling(temperature=0)


def _placement(ctx: int = 1024, **kw) -> Placement:
    return replace(Placement.cpu_only(ctx=ctx, threads=2), **kw)


@pytest.fixture(scope="module")
def gguf(gguf_factory):
    return gguf_factory("tiny", "q4_k_m")


@pytest.fixture(scope="module")
def engine(gguf):
    with Engine.load(gguf, _placement(), cache=CacheConfig(min_tokens=16)) as eng:
        yield eng


@pytest.fixture(scope="module")
def exact_engine(gguf):
    # One token per ubatch: every token takes the same kernels whether it is decoded warm or cold, so the
    # reused KV must give bit-identical logits (batched matmuls round differently, and a random MoE router
    # turns that rounding into different experts).
    with Engine.load(gguf, _placement(n_batch=1, n_ubatch=1), cache=CacheConfig(min_tokens=16)) as eng:
        yield eng


def _prompt(eng: Engine, text: str) -> list[int]:
    return eng.tokenize(f"[gMASK]<sop><|user|>\n{text}<|assistant|>")


def _random_prompt(eng: Engine, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    body = [int(t) for t in rng.integers(0, 2900, n)]  # ordinary tokens (specials live at 3000+)
    return eng.tokenize("[gMASK]<sop><|user|>\n") + body


def _run(eng: Engine, prompt, sampling=GREEDY, **kw):
    outs = list(eng.generate(prompt, sampling, **kw))
    return outs, outs[-1].stats


# --------------------------------------------------------------------------------------------- loading
def test_load_reports_buffers_and_eog_set(engine, gguf):
    ids = {engine.token_id(t) for t in EOG_TEXTS}
    assert None not in ids and engine.eog_ids == ids
    meta = read_gguf(gguf).metadata
    # K and V for the 3 trunk layers only (the NextN layer has no KV in the main context)
    n_layer = meta["glm4moe.block_count"] - meta["glm4moe.nextn_predict_layers"]
    kv_per_token = 2 * n_layer * meta["glm4moe.attention.head_count_kv"] * meta["glm4moe.attention.key_length"] * 2
    assert sum(engine.report.buffers["kv"].values()) == kv_per_token * engine.n_ctx
    assert sum(engine.report.buffers["model"].values()) > 0 and engine.report.buffers["compute"]
    assert engine.report.overridden == {}


def test_tensor_overrides_are_applied_per_tensor(gguf):
    with Engine.load(gguf, _placement(tensor_overrides=[(EXPERTS, "CPU")])) as eng:
        overridden = eng.report.overridden
    meta = read_gguf(gguf)
    n_trunk = meta.metadata["glm4moe.block_count"] - meta.metadata["glm4moe.nextn_predict_layers"]
    want = {t.name for t in meta.tensors if re.search(EXPERTS, t.name) and int(t.name.split(".")[1]) < n_trunk}
    assert want and set(overridden) == want  # llama.cpp logged "buffer type overridden" for exactly these
    assert set(overridden.values()) <= {"CPU", "CPU_REPACK"}


def test_bad_overrides_are_refused(gguf):
    with pytest.raises(EngineError, match="unknown buffer type 'NOPE'") as err:
        Engine.load(gguf, _placement(tensor_overrides=[(EXPERTS, "NOPE")]))
    assert "available: CPU" in err.value.one_line()
    with pytest.raises(EngineError, match="invalid tensor override pattern"):
        Engine.load(gguf, _placement(tensor_overrides=[("blk.(", "CPU")]))


def test_kv_cache_types(gguf):
    with Engine.load(gguf, _placement(type_k="q8_0", type_v="q8_0", flash_attn=True)) as eng:
        q8 = sum(eng.report.buffers["kv"].values())
        assert _run(eng, _prompt(eng, "hi"), max_tokens=3)[0][-1].finish_reason
    with Engine.load(gguf, _placement()) as eng:
        f16 = sum(eng.report.buffers["kv"].values())
    assert q8 == pytest.approx(f16 * 34 / 64, rel=0.01)  # q8_0: 34 bytes per 32 values, f16: 64
    with pytest.raises(EngineError, match="quantized V cache requires flash_attn"):
        Engine.load(gguf, _placement(type_v="q8_0", flash_attn=False))
    with pytest.raises(InputError, match="unknown KV cache type"):
        Engine.load(gguf, _placement(type_k="q3_x"))


def test_plan_that_does_not_fit_is_refused_before_loading(gguf):
    from glmlocal.plan import hardware
    from glmlocal.plan.options import PlanOptions

    tiny_machine = hardware.probe(PlanOptions(cpu_only=True, ram="1MiB", cpu_bw=10))
    with pytest.raises(PlanError):
        Engine.load(gguf, None, n_ctx=1024, hardware=tiny_machine)


def test_placement_predicted_not_to_fit_is_refused(gguf):
    from glmlocal.plan.planner import DevicePlan

    full_gpu = DevicePlan("CUDA0", weights=20 << 30, kv=4 << 30, compute=1 << 30, capacity=24 << 30)
    with pytest.raises(PlanError, match="25.0 GiB on CUDA0, which has 24.0 GiB free"):
        Engine.load(gguf, _placement(n_gpu_layers=99, devices=[full_gpu]))
    fine = DevicePlan("CPU", weights=64 << 30, kv=1 << 20, compute=1 << 20, capacity=8 << 30)  # mmap pages weights
    with Engine.load(gguf, _placement(devices=[fine])) as eng:
        assert eng.n_ctx == 1024


def test_a_constructor_that_fails_frees_the_model_and_context_once(gguf, monkeypatch):
    import llama_cpp.llama_cpp as C

    import glmlocal.engine.engine as engine_mod

    freed: list[str] = []
    for name in ("llama_free", "llama_model_free"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda p, real=real, name=name: (freed.append(name), real(p))[1])

    def broken(*a, **kw):
        raise RuntimeError("slot table")

    monkeypatch.setattr(engine_mod, "SlotTable", broken)
    with pytest.raises(RuntimeError, match="slot table"):
        Engine.load(gguf, _placement())
    import gc

    gc.collect()  # the half-built Engine's __del__ must not free them a second time
    assert sorted(freed) == ["llama_free", "llama_model_free"]
    monkeypatch.undo()
    with Engine.load(gguf, _placement()) as eng:  # and the next load works
        assert eng.n_ctx == 1024


def test_planned_load_on_this_machine_and_progress(gguf):
    seen: list[float] = []
    with Engine.load(gguf, None, n_ctx=512, progress=seen.append) as eng:
        assert eng.n_ctx == 512
        outs, _ = _run(eng, _prompt(eng, "hi"), max_tokens=3)
        assert outs[-1].finish_reason
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


def test_bad_files(tmp_path, gguf):
    with pytest.raises(InputError, match="not found"):
        Engine.load(tmp_path / "missing.gguf", _placement())
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match="not a GGUF"):
        Engine.load(tmp_path / "x.gguf", _placement())
    (tmp_path / "cut.gguf").write_bytes(gguf.read_bytes()[: 1 << 20])  # truncated inside the tensor data
    with pytest.raises(EngineError, match="could not load"):
        Engine.load(tmp_path / "cut.gguf", _placement())


# --------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("eog_text", EOG_TEXTS)
def test_stops_on_each_end_of_generation_token(engine, eog_text):
    eog = engine.token_id(eog_text)
    outs, stats = _run(engine, _prompt(engine, "say bye"), Sampling(temperature=0, logit_bias={eog: 50.0}),
                       max_tokens=20)
    assert len(outs) == 1 and outs[0].token == eog and outs[0].eog and outs[0].finish_reason == "stop"
    assert outs[0].text == "" and stats.completion_tokens == 1


def test_length_finish_and_stream_text_matches_detokenize(engine):
    outs, stats = _run(engine, _prompt(engine, "héllo 世界 🙂"), Sampling(seed=7, logit_bias={
        t: float("-inf") for t in engine.eog_ids}), max_tokens=40)
    assert outs[-1].finish_reason == "length" and stats.completion_tokens == 40 == len(outs)
    assert "".join(o.text for o in outs) == engine.detokenize([o.token for o in outs])
    assert engine.detokenize(engine.tokenize("héllo 世界 🙂 <tool_call>")) == "héllo 世界 🙂 <tool_call>"


def test_seeded_sampling_is_reproducible(engine):
    p = _prompt(engine, "pick numbers")
    a = [o.token for o in _run(engine, p, Sampling(seed=3), max_tokens=12)[0]]
    b = [o.token for o in _run(engine, p, Sampling(seed=3), max_tokens=12)[0]]
    c = [o.token for o in _run(engine, p, Sampling(seed=4), max_tokens=12)[0]]
    assert a == b and a != c


def test_grammar_and_stop_strings(engine):
    p = _prompt(engine, "yes or no?")
    outs, _ = _run(engine, p, Sampling(seed=1), grammar='root ::= "yes" | "no"', max_tokens=20)
    assert "".join(o.text for o in outs) in ("yes", "no") and outs[-1].finish_reason == "stop" and outs[-1].eog
    outs, _ = _run(engine, p, Sampling(seed=1, stop=("STOP",)), grammar='root ::= "abc" "STOP" "def"', max_tokens=20)
    assert "".join(o.text for o in outs) == "abc" and outs[-1].finish_reason == "stop" and not outs[-1].eog


def test_invalid_grammar_raises_before_decoding(engine):
    with pytest.raises(EngineError, match="Undefined rule identifier 'nothing'"):
        engine.generate(_prompt(engine, "x"), GREEDY, grammar="root ::= nothing")


def test_context_overflow_is_refused_before_decoding(gguf):
    with Engine.load(gguf, _placement(ctx=256)) as eng:
        long = _random_prompt(eng, 300, 0)
        with pytest.raises(ContextOverflowError) as err:
            eng.generate(long, GREEDY)
        assert (err.value.prompt_tokens, err.value.n_ctx) == (len(long), 256)
        p = _random_prompt(eng, 200, 1)
        with pytest.raises(ContextOverflowError):
            eng.generate(p, GREEDY, max_tokens=100)
        no_eog = Sampling(temperature=0, logit_bias={t: float("-inf") for t in eng.eog_ids})
        outs, stats = _run(eng, p, no_eog)  # max_tokens=None fills the context, then stops with "length"
        assert outs[-1].finish_reason == "length" and stats.prompt_tokens + stats.completion_tokens == 256


def test_cancellation(engine):
    p = _prompt(engine, "count forever")
    no_eog = Sampling(seed=2, logit_bias={t: float("-inf") for t in engine.eog_ids})
    cancel = threading.Event()
    got = []
    for out in engine.generate(p, no_eog, max_tokens=200, cancel=cancel):
        got.append(out)
        if len(got) == 3:
            cancel.set()
    assert got[-1].finish_reason == "cancelled" and len(got) == 4
    outs, stats = _run(engine, p, no_eog, max_tokens=5, cancel=cancel)  # already set: nothing is decoded
    assert [o.finish_reason for o in outs] == ["cancelled"] and stats.completion_tokens == 0
    assert _run(engine, p, GREEDY, max_tokens=2)[0]  # the engine is usable afterwards


# --------------------------------------------------------------------------------------------- KV reuse
def test_prefix_reuse_is_reported(engine):
    engine.reset()
    first = _random_prompt(engine, 120, 10)
    outs, s1 = _run(engine, first, Sampling(seed=5), max_tokens=8)
    assert s1.cached_tokens == 0
    reply = [o.token for o in outs if not o.eog]
    second = first + reply + _random_prompt(engine, 20, 11)
    _, s2 = _run(engine, second, Sampling(seed=5), max_tokens=4)
    # everything decoded so far is reused: the prompt plus the reply except its last (never decoded) token
    assert s2.cached_tokens == len(first) + len(reply) - 1 and s2.cache_source == "live"


def _first_logits(eng: Engine, prompt, n: int = 6):
    outs, stats = _run(eng, prompt, Sampling(seed=11), max_tokens=n, want_logits=True)
    return [o.token for o in outs], np.stack([o.logits for o in outs]), stats


def test_reused_prefix_gives_identical_logits_to_a_cold_run(exact_engine):
    eng = exact_engine
    eng.reset()
    first = _random_prompt(eng, 60, 20)
    outs, _ = _run(eng, first, Sampling(seed=1), max_tokens=6)
    second = first + [o.token for o in outs if not o.eog] + _random_prompt(eng, 10, 21)
    warm_tokens, warm_logits, warm = _first_logits(eng, second)
    eng.reset()
    cold_tokens, cold_logits, cold = _first_logits(eng, second)
    assert warm.cached_tokens > len(first) and cold.cached_tokens == 0
    assert warm_tokens == cold_tokens
    np.testing.assert_array_equal(warm_logits, cold_logits)


def test_alternating_conversations_do_not_evict_each_other(exact_engine):
    eng = exact_engine
    eng.reset()
    conv_a, conv_b = _random_prompt(eng, 80, 30), _random_prompt(eng, 90, 31)
    _run(eng, conv_a, max_tokens=2)
    _run(eng, conv_b, max_tokens=2)  # stashes A
    a2 = conv_a + _random_prompt(eng, 5, 32)
    tokens, logits, st = _first_logits(eng, a2)
    assert st.cache_source == "stash" and st.cached_tokens == len(conv_a)
    b2 = conv_b + _random_prompt(eng, 5, 33)
    _, _, st_b = _first_logits(eng, b2)
    assert st_b.cache_source == "stash" and st_b.cached_tokens == len(conv_b)
    assert len(eng.state_cache) >= 1
    eng.reset()
    cold_tokens, cold_logits, _ = _first_logits(eng, a2)
    assert tokens == cold_tokens
    np.testing.assert_array_equal(logits, cold_logits)


def test_state_cache_is_bounded(gguf):
    with Engine.load(gguf, _placement(), cache=CacheConfig(max_entries=2, min_tokens=16)) as eng:
        convs = [_random_prompt(eng, 40, 40 + i) for i in range(4)]
        for c in convs:
            _run(eng, c, max_tokens=1)
        assert len(eng.state_cache) == 2  # the live one plus two stashed; the oldest was dropped
        _, st = _run(eng, convs[0] + [5], max_tokens=1)
        assert st.cached_tokens < 10
        _, st = _run(eng, convs[2] + [5], max_tokens=1)
        assert st.cache_source == "stash" and st.cached_tokens == len(convs[2])


# --------------------------------------------------------------------------------------------- threads
def test_one_generation_at_a_time(engine):
    p = _prompt(engine, "first")
    first = engine.generate(p, Sampling(seed=1), max_tokens=50)
    next(first)  # holds the engine lock now
    started, done = threading.Event(), threading.Event()
    result = {}

    def other():
        started.set()
        result["outs"] = list(engine.generate(_prompt(engine, "second"), GREEDY, max_tokens=3))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    started.wait()
    time.sleep(0.3)
    assert not done.is_set()  # blocked behind the open stream
    first.close()  # closing a stream early releases the lock
    t.join(30)
    assert done.is_set() and result["outs"][-1].finish_reason in ("stop", "length")


def test_logit_bias_outside_the_vocabulary_is_refused_before_generation(engine):
    """llama.cpp ignores bias entries for ids it does not have; a client sending one has a bug worth hearing."""
    prompt = _prompt(engine, "Hello")
    for bad in (engine.n_vocab, -1):
        with pytest.raises(InputError, match=f"logit_bias: token id {bad} outside the vocabulary of {engine.n_vocab}"):
            engine.generate(prompt, replace(GREEDY, logit_bias={bad: 5.0}), max_tokens=2)
    outs, _ = _run(engine, prompt, max_tokens=1)
    banned = outs[0].token  # the greedy pick
    outs, _ = _run(engine, prompt, replace(GREEDY, logit_bias={banned: float("-inf")}), max_tokens=1)
    assert outs[0].token is not None and outs[0].token != banned  # an in-range bias still works
