"""Speculative decoding on the trained tiny GLM fixture (tests/fixtures/trained.py), whose NextN head was trained
the way GLM's MTP is, so drafts are right often and acceptance means something:

- llama.cpp's MTP logits, as the engine's MTP context computes them incrementally during generation, equal the
  torch NextN forward written from llama.cpp's glm4moe graph_mtp (trained.nextn_logits), on both layouts;
- MTP drafts are accepted where the model is predictable, n-gram drafts where it re-emits its prompt;
- greedy output with many accepted drafts equals plain decoding (F32), and the MTP KV then equals a rebuild;
- at temperature > 0 the tokens follow the target's distribution: a chi-square test of the tokens at the
  verified positions, drafts on vs off, over many seeds (and the same test tells T=0.8 from T=1.3 apart).

The fixture trains for 4-7 CPU minutes on first use (cached), hence `slow`.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from glmlocal.engine.engine import Engine
from glmlocal.engine.generation import Sampling
from tests.test_spec import (
    MtpReference,
    check_mtp_kv,
    engine_root_logits,
    placement,
    spec_engine,
    tokens,
)

pytestmark = pytest.mark.slow
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module", params=["tiny45", "tiny"])
def layout(request):
    return request.param


def windows(eng: Engine, n: int, size: int = 64, seed: int = 5) -> list[list[int]]:
    """Token windows of the code the fixture learnt (the prompts it continues predictably)."""
    from tests.fixtures import trained_corpus as T

    rng = random.Random(seed)
    stream = [t for m in T.LM_MODULES for t in eng.tokenize(T.module_text(m))]
    return [stream[s:s + size] for s in (rng.randrange(len(stream) - 2 * size) for _ in range(n))]


def test_mtp_logits_equal_the_torch_nextn_forward(trained_factory, layout):
    from tests.conftest import build_cached_trained_checkpoint
    from tests.fixtures import trained as T

    ckpt = build_cached_trained_checkpoint(layout)
    models = T.load_trained(ckpt)
    with spec_engine(trained_factory(layout, "f32"), "mtp", 2) as eng:
        for p in windows(eng, 2, seed=1):
            for n in (1, 40):  # right after the prompt, and after steps with accepted and rejected drafts
                eng.reset()
                hist = p + tokens(eng.generate(p, GREEDY, max_tokens=n))
                got = engine_root_logits(eng, 0, hist[:-1], hist[-1])
                want = T.nextn_logits(ckpt, hist, models)[1][-1]
                assert np.max(np.abs(got - want)) < 0.02 and got.argmax() == want.argmax()  # logits ~ 3 rms


def test_greedy_with_accepted_mtp_drafts_equals_plain_decoding(trained_factory, layout):
    path = trained_factory(layout, "f32")
    ref = MtpReference(path)
    try:
        with Engine.load(path, placement()) as plain, spec_engine(path, "mtp+ngram", 3) as eng:
            accepted = 0
            for p in windows(eng, 3, seed=2):
                plain.reset()
                want = tokens(plain.generate(p, GREEDY, max_tokens=96))
                eng.reset()
                outs = list(eng.generate(p, GREEDY, max_tokens=96))
                assert tokens(outs) == want
                accepted += outs[-1].stats.draft_n_accepted
                check_mtp_kv(eng, ref, 0, p + want)
            assert accepted > 100 and eng.speculator.stats["mtp"].accepted > 50
    finally:
        ref.close()


@pytest.mark.parametrize("k,least", [(1, 0.6), (2, 0.5)])
def test_mtp_drafts_are_accepted_where_the_model_is_predictable(trained_factory, layout, k, least):
    with spec_engine(trained_factory(layout, "bf16"), "mtp", k) as eng:
        drafted = accepted = 0
        for p in windows(eng, 6, seed=3):
            eng.reset()
            st = list(eng.generate(p, GREEDY, max_tokens=96))[-1].stats
            drafted, accepted = drafted + st.draft_n, accepted + st.draft_n_accepted
    assert accepted / drafted >= least, (accepted, drafted)


def test_ngram_drafts_are_accepted_when_the_model_re_emits_its_prompt(trained_factory):
    from tests.fixtures import trained_corpus as T

    with spec_engine(trained_factory("tiny45", "bf16"), "ngram", 16) as eng:
        drafted = accepted = 0
        for f, block in random.Random(4).sample([x for x in T.copy_blocks() if 300 < len(x[1]) < 900], 4):
            eng.reset()
            p = eng.tokenize(T.copy_prompt(f, block))
            st = list(eng.generate(p, GREEDY, max_tokens=len(eng.tokenize(block)) + 8))[-1].stats
            drafted, accepted = drafted + st.draft_n, accepted + st.draft_n_accepted
    assert accepted / drafted >= 0.6, (accepted, drafted)


def verified_tokens(eng: Engine, prompt: list[int], sampling: Sampling, seeds: range) -> list[list[int]]:
    """Tokens 2..4 of a sampled continuation per seed: the ones drafts are verified for (the first comes from
    the prompt's logits, before any draft)."""
    from dataclasses import replace

    return [tokens(eng.generate(prompt, replace(sampling, seed=s), max_tokens=4))[1:] for s in seeds]


def homogeneity(a: list[int], b: list[int]) -> float:
    """Chi-square p-value that two samples of tokens come from one distribution (tokens seen fewer than 10
    times in both together are pooled)."""
    ca, cb = Counter(a), Counter(b)
    common = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= 10]
    rows = [[ca[t] for t in common] + [len(a) - sum(ca[t] for t in common)],
            [cb[t] for t in common] + [len(b) - sum(cb[t] for t in common)]]
    keep = [i for i in range(len(rows[0])) if rows[0][i] + rows[1][i] > 0]
    return float(chi2_contingency([[r[i] for i in keep] for r in rows])[1])


def test_sampled_tokens_follow_the_target_distribution_with_drafts(trained_factory):
    # Different seeds on each side: not the same random numbers, the same distribution. 300 runs each.
    path = trained_factory("tiny45", "bf16")
    warm = Sampling(temperature=0.8, top_k=0, top_p=1.0)
    with Engine.load(path, placement()) as plain, spec_engine(path, "mtp", 3) as eng:
        prompt = windows(eng, 1, seed=6)[0]
        off = verified_tokens(plain, prompt, warm, range(300))
        on = verified_tokens(eng, prompt, warm, range(1000, 1300))
        hot = verified_tokens(plain, prompt, Sampling(temperature=1.3, top_k=0, top_p=1.0), range(2000, 2300))
        st = eng.speculator.stats["mtp"]
    assert st.accepted > 100 and st.drafted - st.accepted > 100  # drafts both kept and thrown away
    for i in range(3):
        p_same = homogeneity([t[i] for t in off], [t[i] for t in on])
        assert p_same > 1e-3, f"token {i + 2}: drafts changed the distribution (p={p_same:.2g})"
    assert min(homogeneity([t[i] for t in off], [t[i] for t in hot]) for i in range(3)) < 1e-3  # power
