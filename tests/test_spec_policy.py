"""The pure parts of speculative decoding: n-gram lookup (engine/ngram.py), the measured cost model and the
mode decisions (engine/spec.py), with tables; no model."""

from __future__ import annotations

import pytest

from glmlocal.engine.ngram import NgramConfig, NgramIndex
from glmlocal.engine.spec import OFF, CostModel, SpecConfig, decide
from glmlocal.errors import InputError


# --------------------------------------------------------------------------------------------- n-gram
@pytest.mark.parametrize("history,n_max,want,match", [
    # the last 3 tokens (1 2 3) occurred before: copy what followed
    ([1, 2, 3, 4, 5, 9, 1, 2, 3], 4, [4, 5, 9, 1], 3),
    # two occurrences: the one whose match reaches further back wins (0 1 2 3, not 7 1 2 3)
    ([0, 1, 2, 3, 8, 7, 1, 2, 3, 6, 0, 1, 2, 3], 2, [8, 7], 4),
    # equally long matches: the most recent wins
    ([1, 2, 3, 8, 5, 1, 2, 3, 6, 5, 1, 2, 3], 1, [6], 4),
    # fewer than key_min tokens in common: nothing
    ([1, 2, 3, 4, 9, 2, 3], 3, None, 0),
    # a continuation may run into the current suffix (a loop)
    ([5, 6, 7, 5, 6, 7], 5, [5, 6, 7], 3),
    ([1, 2, 3], 3, None, 0),
    # a continuation is drafted about as far as the match reaches back (here 5 tokens), at least 4
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 9, 1, 2, 3, 4, 5], 16, [6, 7, 8, 9, 10], 5),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 9, 7, 2, 3, 4], 16, [5, 6, 7, 8], 3),
])
def test_ngram_copies_what_followed_the_best_earlier_match(history, n_max, want, match):
    found = NgramIndex().find(history, n_max)
    assert (found.tokens if found else None) == want
    assert (found.match if found else 0) == match


def test_ngram_index_grows_with_the_history_and_bounds_its_work():
    h = [5, 1, 2, 9, 3, 1, 2, 8, 4, 1, 2, 7, 5, 1, 2]
    idx = NgramIndex(NgramConfig(key_min=2, key_max=4))
    assert idx.find(h[:6], 3) is None and idx.find(h[:7], 3).tokens == [9, 3, 1]
    # (1 2) occurred three times; the first one's match is longest (5 1 2)
    assert idx.find(h, 2).tokens == [9, 3]
    # looking at the two most recent occurrences only: equally long matches, the most recent wins
    assert NgramIndex(NgramConfig(key_min=2, key_max=4, candidates=2)).find(h, 2).tokens == [7, 5]
    with pytest.raises(ValueError):
        NgramConfig(key_min=5, key_max=4)


def test_ngram_long_histories_are_indexed_once():
    h = list(range(5000)) * 2
    idx = NgramIndex()
    assert idx.find(h[:5003], 4).tokens == [3, 4, 5, 6]
    assert idx.find(h, 4).tokens == [0, 1, 2, 3]  # ...4997 4998 4999 | 0 1 2 3 after the first 4999


# --------------------------------------------------------------------------------------------- cost model
def feed(model: CostModel, arm, dt: float, n: int, times: int = 1) -> None:
    for _ in range(times):
        model.observe(arm, dt, n)


def test_cost_model_probes_every_arm_then_keeps_the_fastest():
    m = CostModel(min_samples=2)
    mtp1, mtp2 = ("mtp", 1), ("mtp", 2)
    seen = []
    for _ in range(6):  # unmeasured arms first, OFF before the others
        arm = m.choose([mtp1, mtp2])
        seen.append(arm)
        feed(m, arm, {OFF: 1.0, mtp1: 1.2, mtp2: 1.4}[arm], {OFF: 1, mtp1: 2, mtp2: 2}[arm])
    assert seen == [OFF, OFF, mtp1, mtp1, mtp2, mtp2]
    assert m.choose([mtp1, mtp2]) == mtp1  # 1.67 tok/s against 1.0 and 1.43
    assert m.pays("mtp") and m.table() == {"off": 1.0, "mtp<=1": 1.7, "mtp<=2": 1.4}


def test_cost_model_backs_off_when_drafts_cost_more_than_they_save():
    # a CPU where verifying 1 + k tokens costs about k + 1 steps: drafting never pays
    m = CostModel(min_samples=2, margin=0.05)
    for arm in (OFF, ("ngram", 16)):
        feed(m, arm, 1.0 if arm == OFF else 8.0, 1 if arm == OFF else 6, times=2)
    assert m.choose([("ngram", 16)]) == OFF and not m.pays("ngram")
    # within the margin is not enough either
    m2 = CostModel(min_samples=1, margin=0.05)
    feed(m2, OFF, 1.0, 1)
    feed(m2, ("mtp", 1), 1.0, 1.03)
    assert m2.choose([("mtp", 1)]) == OFF


def test_cost_model_forgets_old_measurements_and_probes_again():
    m = CostModel(min_samples=1, reprobe=10)
    feed(m, OFF, 1.0, 1)
    feed(m, ("mtp", 1), 4.0, 2)
    assert m.choose([("mtp", 1)]) == OFF
    for _ in range(10):
        feed(m, OFF, 1.0, 1)
        m.choose([])
    assert m.choose([("mtp", 1)]) == ("mtp", 1)  # its only sample is 11 steps old: measured again
    assert m.choose([]) == OFF


# --------------------------------------------------------------------------------------------- modes
def test_modes_decide_what_runs_and_say_why():
    auto = decide(SpecConfig(), has_nextn=True, planned_mtp=True, planned_draft=2)
    assert (auto.mtp, auto.ngram, auto.adaptive, auto.n_mtp, auto.n_ngram) == (True, True, True, 2, 16)
    assert auto.describe().startswith("auto: MTP up to 2 + n-gram up to 16 drafts per step, measured")
    no_nextn = decide(SpecConfig("auto"), has_nextn=False, planned_mtp=False)
    assert not no_nextn.mtp and no_nextn.ngram and "no NextN layer" in no_nextn.describe()
    unplanned = decide(SpecConfig("auto", 5), has_nextn=True, planned_mtp=False)
    assert not unplanned.mtp and unplanned.n_ngram == 5 and "left out by the plan" in unplanned.describe()
    both = decide(SpecConfig("mtp+ngram", 4), has_nextn=True, planned_mtp=True)
    assert (both.mtp, both.ngram, both.adaptive, both.n_mtp) == (True, True, False, 4)
    off = decide(SpecConfig("off"), has_nextn=True, planned_mtp=True)
    assert not off.on and off.describe() == "off (--spec off)"
    assert [SpecConfig(m).plan_mtp for m in ("auto", "mtp", "mtp+ngram", "ngram", "off")] == \
        [None, True, True, False, False]


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "fast"}, "unknown --spec 'fast'"),
    ({"n_draft": 0}, "--draft must be at least 1, got 0"),
    ({"n_draft": -3}, "--draft must be at least 1, got -3"),
    ({"n_draft": 65}, "--draft must be at most 64, got 65"),
])
def test_bad_options_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message.replace("'", ".")):
        SpecConfig(**kwargs)
    assert SpecConfig(n_draft=64).n_draft == 64  # the limit itself is allowed


@pytest.mark.parametrize("mode", ["mtp", "mtp+ngram"])
def test_mtp_without_a_nextn_layer_names_the_ngram_mode(mode):
    with pytest.raises(InputError) as err:
        decide(SpecConfig(mode), has_nextn=False, planned_mtp=False)
    assert "no NextN (MTP) layer" in err.value.one_line() and "--spec ngram" in err.value.one_line()
    with pytest.raises(InputError, match="no room"):
        decide(SpecConfig(mode), has_nextn=True, planned_mtp=False)


def test_cost_model_tries_larger_drafts_only_after_smaller_ones_come_close():
    m = CostModel(min_samples=1, gate=0.8)
    feed(m, OFF, 1.0, 1)
    feed(m, ("mtp", 1), 1.0, 0.5)  # half as fast as plain steps: 2 and 3 drafts are not worth a try
    assert m.choose([("mtp", 1), ("mtp", 2), ("mtp", 3)]) == OFF
    feed(m, ("ngram", 4), 1.0, 0.9)  # close: the next cap is measured
    assert m.choose([("ngram", 4), ("ngram", 16)]) == ("ngram", 16)


def test_cost_model_waits_longer_each_time_an_arm_still_loses():
    m = CostModel(min_samples=1, reprobe=4)
    probes = []
    for step in range(200):
        arm = m.choose([("mtp", 1)])
        probes += [step] if arm == ("mtp", 1) else []
        feed(m, arm, 1.0, 1 if arm == OFF else 0.3)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[:5] == [5, 9, 17, 33, 65]  # 4, 8, 16, 32, 64 steps without a sample, then one probe step


def test_cost_model_shrugs_off_slow_steps_and_remeasures_plain_steps():
    m = CostModel(min_samples=3, reprobe_off=8)
    arms = []
    for step in range(60):
        arm = m.choose([("mtp", 1)])
        arms.append(arm)
        # plain steps take 1 ms, MTP steps 2 ms for 1.5 tokens; the first two plain steps hit a burst of load
        dt = {OFF: 0.02 if step in (1, 2) else 0.001, ("mtp", 1): 0.002}[arm]
        feed(m, arm, dt, 1 if arm == OFF else 1.5)
    assert arms[:3] == [OFF] * 3 and ("mtp", 1) in arms[3:6]  # fooled at first (plain looked 20x slower)...
    assert arms[-20:] == [OFF] * 20  # ...until plain steps were measured afresh
    one = CostModel(min_samples=3)
    for dt in (0.001, 0.05, 0.001):  # one slow step in three moves the median, not the estimate
        feed(one, OFF, dt, 1)
    assert one.rate(OFF) == pytest.approx(1000)


def test_auto_does_not_look_for_drafts_for_a_few_steps_after_finding_none():
    from types import SimpleNamespace

    from glmlocal.engine.spec import IDLE, Speculator

    sp = Speculator(decide(SpecConfig("auto"), has_nextn=False, planned_mtp=False), None)
    feed(sp.model, OFF, 1.0, 1, times=3)
    feed(sp.model, ("ngram", 4), 1.0, 4, times=3)  # measured: n-gram drafts pay
    looked = []
    propose = sp.propose
    sp.propose = lambda seq, n_max, index: looked.append(len(seq.history)) or propose(seq, n_max, index)
    drafter = sp.speculation().drafter
    seq = SimpleNamespace(history=[7, 8, 9, 1, 2], seq_id=0, n_past=4, key=1, n_prompt=5, step=0,
                          after_prefill=False)
    for t in [3, 4, 5, 6, 7, 8, 9, 1, 2, 3]:  # the history repeats itself from the second 7 on
        drafter.draft(seq, 8)
        seq.history.append(t)
    # a step with nothing to draft, IDLE steps without a look, again, then drafts every step
    assert looked == [5, 5 + IDLE + 1, 5 + 2 * (IDLE + 1), 14]
    assert drafter.draft(seq, 8)[:4] == [4, 5, 6, 7]  # ... 7 8 9 1 2 3: what followed 7 8 9 1 2 3 before


def test_a_step_is_timed_only_when_it_ran_right_after_the_previous_one_without_a_prompt_chunk():
    from types import SimpleNamespace

    from glmlocal.engine.spec import Speculator

    sp = Speculator(decide(SpecConfig("ngram", 4), has_nextn=False, planned_mtp=False), None)
    timed: list[tuple] = []
    sp.model.observe = lambda arm, dt, n: timed.append((arm, n))
    drafter = sp.speculation([5, 6, 7, 8, 5, 6, 7]).drafter  # the prompt is indexed before the first step
    seq = SimpleNamespace(history=[5, 6, 7, 8, 5, 6, 7], seq_id=0, n_past=6, key=1, n_prompt=7, step=0,
                          after_prefill=False)
    # (loop step, previous step carried a prompt chunk): 1 follows 0; 3 skips a step (held back behind its
    # reader); 4 follows 3 but after a step shared with another request's prompt; 5 follows 4 cleanly
    for step, prefill in [(0, False), (1, False), (3, False), (4, True), (5, False)]:
        seq.step, seq.after_prefill = step, prefill
        assert drafter.draft(seq, 4)[:1] == [8]  # ... 5 6 7 -> 8, found in the indexed prompt
        seq.history.extend([8, 5, 6, 7])
    assert len(timed) == 2 and all(n == 4 for _, n in timed)
