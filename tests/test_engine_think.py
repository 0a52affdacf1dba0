"""The engine's thinking-budget hook on real llama.cpp with the random tiny GLM fixture (a model that never
closes `</think>` on its own): the closing tag is forced at the budget, to the token, accepted into the grammar
so it continues after it, the opening tag is banned once the budget is spent, and every TokenOut says whether
its token counted as thinking."""

from __future__ import annotations

from dataclasses import replace

import pytest

from glmlocal.engine.budget import ThinkBudget
from glmlocal.engine.engine import Engine
from glmlocal.engine.generation import Sampling
from glmlocal.errors import InputError
from glmlocal.plan.planner import Placement


@pytest.fixture(scope="module")
def engine(gguf_factory):
    with Engine.load(gguf_factory("tiny", "q4_k_m"), Placement.cpu_only(ctx=1024, threads=2)) as eng:
        yield eng


def _ids(eng: Engine) -> tuple[int, int, int]:
    return eng.token_id("<think>"), eng.token_id("</think>"), eng.token_id("<tool_call>")


def _sampling(eng: Engine, seed: int | None = 3) -> Sampling:
    """Random sampling that never ends the turn on its own (end-of-generation tokens banned)."""
    ban = {t: float("-inf") for t in eng.eog_ids}
    return Sampling(seed=seed, temperature=0 if seed is None else 1.0, logit_bias=ban)


def _inside_prompt(eng: Engine) -> list[int]:
    return eng.tokenize("[gMASK]<sop><|user|>\nThink hard.<|assistant|><think>")  # GLM-4.7: the block is open


@pytest.mark.parametrize("budget,seed", [(1, 1), (2, 2), (7, None), (40, 4)])
def test_a_never_closing_model_is_closed_at_the_budget(engine, budget, seed):
    open_id, close_id, call_id = _ids(engine)
    outs = list(engine.generate(_inside_prompt(engine), _sampling(engine, seed), max_tokens=budget + 30,
                                think=ThinkBudget(open_id, close_id, budget, starts_inside=True, call_id=call_id)))
    toks = [o.token for o in outs]
    flags = [o.thinking for o in outs]
    assert flags == [True] * budget + [False] * (len(outs) - budget)
    assert toks.index(close_id) == budget - 1 and call_id not in toks[:budget]  # closed by the engine, not the model
    assert open_id not in toks[budget:]  # no second block: the budget is spent
    assert outs[-1].finish_reason == "length" and len(outs) == budget + 30


def test_the_opening_tag_is_banned_once_the_budget_is_spent(engine):
    open_id, close_id, _ = _ids(engine)
    prompt = engine.tokenize("[gMASK]<sop><|user|>\nHi<|assistant|>")  # GLM-4.5: the model opens the block
    sampling = _sampling(engine, 5)
    sampling = replace(sampling, logit_bias={**sampling.logit_bias, open_id: 30.0})  # it wants to think, always
    outs = list(engine.generate(prompt, sampling, max_tokens=24, think=ThinkBudget(open_id, close_id, 4)))
    toks = [o.token for o in outs]
    assert toks[:4] == [open_id, toks[1], toks[2], close_id] and sum(o.thinking for o in outs) == 4
    assert open_id not in toks[4:]
    unbounded = list(engine.generate(prompt, sampling, max_tokens=24, think=ThinkBudget(open_id, close_id, None)))
    assert [o.token for o in unbounded].count(open_id) > 1  # without a budget the bias wins: only counted


def test_a_forced_close_is_accepted_into_the_grammar(engine):
    open_id, close_id, _ = _ids(engine)
    grammar = 'root ::= [^<]* </think> "done"\n'  # the tag as a token: the body can end at any point
    outs = list(engine.generate(_inside_prompt(engine), Sampling(seed=7), grammar=grammar, max_tokens=60,
                                think=ThinkBudget(open_id, close_id, 9, starts_inside=True)))
    text = "".join(o.text for o in outs)
    assert [o.token for o in outs][8] == close_id and text.endswith("</think>done")
    assert outs[-1].finish_reason == "stop" and outs[-1].eog  # the grammar was complete: it ended the turn


def test_a_grammar_that_cannot_take_the_close_is_never_forced(engine):
    open_id, close_id, _ = _ids(engine)
    outs = list(engine.generate(_inside_prompt(engine), _sampling(engine, 2), grammar="root ::= [a-z ]+\n",
                                max_tokens=12, think=ThinkBudget(open_id, close_id, 3, starts_inside=True)))
    assert close_id not in [o.token for o in outs] and len(outs) == 12  # sampled instead of aborting llama.cpp
    assert all(c in "abcdefghijklmnopqrstuvwxyz " for c in "".join(o.text for o in outs))


def test_think_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(InputError, match="thinking budget: token id"):
        engine.generate(_inside_prompt(engine), max_tokens=2, think=ThinkBudget(10**7, 1, 5))
