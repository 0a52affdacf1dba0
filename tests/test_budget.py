"""The thinking-budget state machine (glmlocal.engine.budget): pure, tested with token tables."""

from __future__ import annotations

import pytest

from glmlocal.engine.budget import (
    UTF8_GUARD,
    ThinkBudget,
    ThinkState,
    char_openers,
    opens_char,
)

OPEN, CLOSE, CALL, A = 10, 11, 12, 1


def run(spec: ThinkBudget, model_wants: list[int]) -> tuple[list[int], list[bool], ThinkState]:
    """Drive the state as the engine does: a forced token replaces what the model wanted; banned tokens are
    replaced by A (what a masked sampler would pick instead)."""
    st, out, flags = ThinkState(spec), [], []
    for want in model_wants:
        tok = st.forced()
        if tok is None:
            tok = A if want in st.banned() else want
        flags.append(st.push(tok))
        out.append(tok)
    return out, flags, st


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8])
def test_a_model_that_never_closes_is_closed_at_the_budget_exactly(budget):
    out, flags, st = run(ThinkBudget(OPEN, CLOSE, budget, starts_inside=True), [A] * 20)
    assert sum(flags) == budget == st.spent
    assert out[budget - 1] == CLOSE and CLOSE not in out[: budget - 1]
    assert not st.inside and st.exhausted


def test_the_opening_tag_counts_when_the_model_writes_it():
    out, flags, _ = run(ThinkBudget(OPEN, CLOSE, 4), [OPEN] + [A] * 10)
    assert out[:4] == [OPEN, A, A, CLOSE] and flags[:4] == [True] * 4 and not any(flags[4:])


def test_a_spent_budget_bans_a_new_block_and_never_goes_over():
    out, flags, st = run(ThinkBudget(OPEN, CLOSE, 3), [OPEN, A, A, A, OPEN, A, OPEN, A])
    assert sum(flags) == 3 and out[2] == CLOSE and OPEN not in out[3:]
    assert st.banned() == (OPEN,)


def test_a_block_that_closes_on_its_own_leaves_room_for_another():
    out, flags, st = run(ThinkBudget(OPEN, CLOSE, 6), [OPEN, A, CLOSE, A, OPEN, A, A, A, A])
    assert sum(flags) == 6 and out[4:7] == [OPEN, A, CLOSE]
    # with one token left outside the block, opening a new one is banned (it could not be closed in budget)
    assert st.spent == 6 and st.banned() == (OPEN,)


def test_a_tool_call_inside_reasoning_ends_the_block():
    out, flags, st = run(ThinkBudget(OPEN, CLOSE, 50, starts_inside=True, call_id=CALL), [A, CALL, A, A])
    assert flags == [True, True, False, False] and not st.inside


def test_no_budget_only_counts():
    out, flags, st = run(ThinkBudget(OPEN, CLOSE, None, starts_inside=True), [A] * 30 + [CLOSE, A])
    assert out == [A] * 30 + [CLOSE, A] and sum(flags) == 31 and st.room() is None and st.banned() == ()


def test_room_is_what_may_be_generated_before_the_forced_close():
    st = ThinkState(ThinkBudget(OPEN, CLOSE, 5, starts_inside=True))
    assert st.room() == 4
    for _ in range(4):
        st.push(A)
    assert st.room() == 0 and st.forced() == CLOSE


def test_a_budget_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        ThinkBudget(OPEN, CLOSE, 0)


@pytest.mark.parametrize("piece,opens", [
    (b"abc", False), (b"", False), ("é".encode(), False), ("é".encode()[:1], True), (b"a\xe4\xba", True),
    (b"\xba\xba", False),  # continuation bytes only: finishing a character, not starting one
    (b"\xb7\xa5\xe6", True), ("人".encode() + "😀".encode()[:3], True), ("😀".encode(), False),
    (b"<think>", False),
])
def test_opens_char(piece, opens):
    assert opens_char(piece) is opens


def test_tokens_that_would_split_a_character_are_banned_just_before_the_forced_close():
    pieces = {0: b"a", 1: b"\xe4", 2: b"\xba\xba", 3: b"x\xf0"}
    openers = char_openers(4, pieces.__getitem__)
    assert openers == (1, 3)
    st = ThinkState(ThinkBudget(OPEN, CLOSE, 8, starts_inside=True, char_openers=openers))
    seen = []
    while st.forced() is None:
        seen.append((st.room(), st.banned()))
        st.push(A)
    assert [r for r, b in seen if b != (OPEN,)] == list(range(UTF8_GUARD, 0, -1))
    assert all(b in ((OPEN,), (OPEN, *openers)) for _, b in seen)
    assert st.room() == 0 and st.forced() == CLOSE


def test_a_budgeted_block_does_not_nest():
    st = ThinkState(ThinkBudget(OPEN, CLOSE, 10, starts_inside=True))
    assert st.banned() == (OPEN,)
    assert ThinkState(ThinkBudget(OPEN, CLOSE, None, starts_inside=True)).banned() == ()  # counting only
