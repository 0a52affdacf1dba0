"""Pure generation helpers: stop strings, incremental UTF-8, the multi-conversation state cache."""

from __future__ import annotations

import pytest

from glmlocal.engine.generation import (
    GenerationStats,
    StateCache,
    StopMatcher,
    Utf8Stream,
    common_prefix,
)


@pytest.mark.parametrize("stops,chunks,want_text,want_hit,want_matched", [
    ([], ["ab", "c"], "abc", False, None),
    (["STOP"], ["ab", "cST", "OPde"], "abc", True, "STOP"),
    (["STOP"], ["abST", "x"], "abSTx", False, None),     # a false start is released once it cannot match
    (["</s>", "END"], ["hello </", "s> more"], "hello ", True, "</s>"),
    (["xyz"], ["xy"], "xy", False, None),                # held back, then flushed at the end
    (["aa"], ["a", "a"], "", True, "aa"),
    (["ab", "b"], ["xab"], "x", True, "ab"),             # earliest match wins
    (["b", "ab", "abc"], ["xabcd"], "x", True, "abc"),   # ...and the longest of those starting there
])
def test_stop_matcher(stops, chunks, want_text, want_hit, want_matched):
    m = StopMatcher(stops)
    text, hit = "", False
    for c in chunks:
        out, hit = m.push(c)
        text += out
        if hit:
            break
    if not hit:
        text += m.flush()
    assert (text, hit, m.matched) == (want_text, want_hit, want_matched)


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopMatcher(["STOP"])
    assert m.push("abcS") == ("abc", False)
    assert m.push("T") == ("", False)
    assert m.push("X") == ("STX", False)


def test_utf8_stream_emits_whole_characters():
    data = "héllo 世界 🙂!".encode()
    pieces = {i: data[i:i + 1] for i in range(len(data))}  # one byte per "token": worst case
    s = Utf8Stream(lambda t: pieces[t])
    out = [s.push(i) for i in range(len(data))]
    assert "".join(out) + s.flush() == "héllo 世界 🙂!"
    assert all("\ufffd" not in o for o in out)
    assert out[data.index("🙂".encode())] == ""  # first byte of a 4-byte char emits nothing


def test_utf8_stream_replaces_invalid_bytes_at_flush():
    s = Utf8Stream(lambda t: b"\xe4\xb8")
    assert s.push(0) == ""
    assert s.flush() == "\ufffd"


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_state_cache_lru_prefix_domination_and_bytes():
    c = StateCache(max_entries=2, max_bytes=100)
    assert c.put([1, 2, 3], "A", 10)
    assert c.put([1, 2, 3, 4, 5], "A2", 10)  # dominates [1, 2, 3]
    assert len(c) == 1
    assert c.put([7, 8], "B", 10)
    assert c.put([9], "C", 10)  # evicts the oldest (A2)
    assert c.best([1, 2, 3, 4]) == (None, 0)
    key, n = c.best([7, 8, 9])
    assert n == 2 and c.take(key) == ((7, 8), "B")
    assert len(c) == 1
    assert not c.put([5], "big", 101)  # larger than the whole budget: refused
    c.put([4], "D", 60)
    c.put([3], "E", 60)  # over max_bytes: the older one goes
    assert c.nbytes <= 100


def test_stats_rates():
    s = GenerationStats(prompt_tokens=100, cached_tokens=60, completion_tokens=11, prompt_s=2.0, decode_s=5.0)
    assert s.tokens_per_s == pytest.approx(2.0)
    assert s.prompt_tokens_per_s == pytest.approx(20.0)
