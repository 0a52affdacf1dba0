"""GLM prompt rendering: native renderer == official Jinja template (parity table), template sourcing,
input normalisation, sandboxing of hostile templates, and prefix stability across turns."""

from __future__ import annotations

import copy
import json

import pytest

from glmlocal.errors import TemplateError
from glmlocal.glm.events import ContentDelta, ReasoningDelta, ToolCallEnd
from glmlocal.glm.parser import StreamParser
from glmlocal.glm.template import (
    ChatTemplate,
    builtin_source,
    content_text,
    normalize_messages,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
WRITE = {"type": "function", "function": {
    "name": "write_file", "description": "Écrit un fichier ✓",
    "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"},
        "opts": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
        "force": {"type": "boolean"}, "ratio": {"type": "number"}, "note": {"type": ["string", "null"]}}}}}


def call(name, args, as_string=False, cid="call_1"):
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


U1 = {"role": "user", "content": "Weather in Paris?"}
SYS = {"role": "system", "content": "You are terse."}
A_CALL = {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
          "tool_calls": [call("get_weather", {"city": "Paris", "days": 2})]}
T1 = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'}
A_FINAL = {"role": "assistant", "content": "It is 20C.", "reasoning_content": "Easy."}
U2 = {"role": "user", "content": "Thanks!"}

CASES = {
    "single_turn": ([U1], None),
    "system": ([SYS, U1], None),
    "multi_turn": ([U1, {"role": "assistant", "content": "Sunny."}, U2], None),
    "tools_only": ([U1], [WEATHER]),
    "call_result_followup": ([SYS, U1, A_CALL, T1, A_FINAL, U2], [WEATHER]),
    "call_result_pending": ([U1, A_CALL, T1], [WEATHER]),
    "several_calls": ([U1, {"role": "assistant", "content": "Checking both.", "tool_calls": [
        call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Rome", "days": 3}, cid="c2")]},
        T1, {"role": "tool", "content": '{"temp": 25}'}, A_FINAL], [WEATHER]),
    "several_results_then_user": ([U1, A_CALL, T1, {"role": "tool", "content": "second"}, U2], [WEATHER]),
    "string_arguments": ([U1, {"role": "assistant", "content": None, "tool_calls": [
        call("get_weather", {"city": "Paris", "days": 2}, as_string=True)]}, T1], [WEATHER]),
    "non_string_arguments": ([U1, {"role": "assistant", "tool_calls": [call("write_file", {
        "path": "a.py", "content": "def f():\n    return '<b>' & 1\n", "opts": {"mode": "w", "n": [1, 2.5]},
        "tags": ["x", "ü"], "force": True, "ratio": 0.25, "note": None})]}, T1], [WRITE]),
    "unicode": ([{"role": "system", "content": "Réponds en français 🙂"},
                 {"role": "user", "content": "日本語で？ naïve café"}], [WRITE]),
    "empty_content": ([{"role": "user", "content": ""}, {"role": "assistant", "content": ""},
                       {"role": "user", "content": "  "}], None),
    "content_parts": ([{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                                    {"type": "image_url", "image_url": {"url": "x"}},
                                                    {"type": "text", "text": "done"}]}], None),
    "inline_think_in_content": ([U1, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nSunny."}, U2], None),
    "reasoning_last_turn": ([U1, {"role": "assistant", "content": "Sunny.", "reasoning_content": " look "}], None),
    "nothink_already": ([{"role": "user", "content": "hi/nothink"}], None),
    "no_args_call": ([U1, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {})]}], [WEATHER]),
    "bare_function_tool": ([U1], [WEATHER["function"]]),
}


def _variants(family):
    clears = (None, True, False) if family == "glm47" else (None, True)
    for thinking in (True, False):
        for clear in clears:
            for gen in (True, False):
                yield {"enable_thinking": thinking, "clear_thinking": clear, "add_generation_prompt": gen}


@pytest.mark.parametrize("family", ["glm45", "glm47"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_native_matches_official_jinja(family, case):
    messages, tools = CASES[case]
    tpl = ChatTemplate.builtin(family)
    for kw in _variants(family):
        before = copy.deepcopy(messages)
        native = tpl.render(messages, tools, renderer="native", **kw)
        jinja = tpl.render(messages, tools, renderer="jinja", **kw)
        assert native == jinja, (case, kw)
        assert messages == before  # rendering never mutates the caller's messages


def test_matches_llamacpp_reference_rendering():
    """The GLM-4.6 rendering documented from llama.cpp's run (shared/reference/llamacpp-glm.md §5.2)."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris", "days": 2})]},
            {"role": "tool", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "It is 20C."}, {"role": "user", "content": "Thanks"}]
    want = ("[gMASK]<sop><|user|>\nWeather in Paris?<|assistant|>\n<think></think>\n<tool_call>get_weather\n"
            "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
            "</tool_call><|observation|>\n<tool_response>\n{\"temp\": 20}\n</tool_response><|assistant|>\n"
            "<think></think>\nIt is 20C.<|user|>\nThanks<|assistant|>")
    assert ChatTemplate.builtin("glm45").render(msgs) == want


def test_glm47_compact_layout_and_preserved_thinking():
    tpl = ChatTemplate.builtin("glm47")
    msgs = [U1, A_CALL, T1, A_FINAL, U2]
    kept = tpl.render(msgs)  # default: preserved thinking, as llama.cpp serves GLM-4.7
    assert "<|assistant|><think>Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key>" in kept
    assert "<|observation|><tool_response>{\"temp\": 20}</tool_response><|assistant|><think>Easy.</think>" in kept
    assert kept.endswith("<|user|>Thanks!<|assistant|><think>")
    cleared = tpl.render(msgs, clear_thinking=True)
    assert "Need the tool." not in cleared and "<|assistant|></think><tool_call>" in cleared
    assert tpl.render(msgs, enable_thinking=False).endswith("<|assistant|></think>")


def test_glm45_thinking_off_and_keep_reasoning_extension():
    tpl = ChatTemplate.builtin("glm45")
    off = tpl.render([U1, A_FINAL, U2], enable_thinking=False)
    assert "Weather in Paris?/nothink" in off and off.endswith("Thanks!/nothink<|assistant|>\n<think></think>")
    assert "<think>Easy.</think>" not in tpl.render([U1, A_FINAL, U2])
    assert "<|assistant|>\n<think>Easy.</think>\nIt is 20C." in tpl.render([U1, A_FINAL, U2], clear_thinking=False)


def test_generation_prompts():
    g45, g47 = ChatTemplate.builtin("glm45"), ChatTemplate.builtin("glm47")
    assert (g45.generation_prompt(True), g45.generation_prompt(False)) == ("<|assistant|>", "<|assistant|>\n<think></think>")
    assert (g47.generation_prompt(True), g47.generation_prompt(False)) == ("<|assistant|><think>", "<|assistant|></think>")
    assert g47.starts_in_thinking(True) and not g47.starts_in_thinking(False)
    assert not g45.starts_in_thinking(True)


def test_normalisation_of_awkward_inputs():
    tpl = ChatTemplate.builtin("glm45")
    as_obj = tpl.render([U1, {"role": "assistant", "tool_calls": [call("get_weather", {"city": "P"})]}])
    as_str = tpl.render([U1, {"role": "assistant", "tool_calls": [call("get_weather", {"city": "P"}, True)]}])
    assert as_obj == as_str
    parts = tpl.render([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}])
    assert parts == tpl.render([{"role": "user", "content": "ab"}])
    dev = tpl.render([{"role": "developer", "content": "rules"}, U1])
    assert "<|system|>\nrules<|user|>" in dev
    tool_parts = normalize_messages([{"role": "tool", "content": [{"type": "text", "text": "out"}]}])
    assert tool_parts[0]["content"] == "out"


PARTS = [{"type": "text", "text": "a"}, "b", {"type": "image_url", "image_url": {"url": "x"}},
         {"type": "input_text", "text": "c"}, {"text": "d"}, {"type": "audio"}, 7]


@pytest.mark.parametrize("content,kwargs,expected", [
    (None, {}, ""), ("plain", {}, "plain"), (PARTS, {}, "abcd"),  # the template's and the transcript's reading
    (PARTS, {"sep": "\n", "image": "[img]"}, "a\nb\n[img]\nc\nd"),  # the server's: parts on lines, a placeholder
    ([], {"sep": "\n"}, ""),
])
def test_one_content_flattener(content, kwargs, expected):
    assert content_text(content, **kwargs) == expected


def test_content_that_is_not_text_or_parts_is_refused():
    with pytest.raises(TemplateError, match="string or a list of parts"):
        content_text({"type": "text", "text": "a"})


@pytest.mark.parametrize("bad,match", [
    ([{"role": "assistant", "tool_calls": [call("f", "{not json", False)]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [call("f", [1, 2])]}], "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], "without a function name"),
    ([{"role": "wizard", "content": "x"}], "unknown message role"),
    ([{"role": "user", "content": 42}], "string or a list"),
    ("hello", "list of message"),
])
def test_bad_messages_are_typed_errors(bad, match):
    with pytest.raises(TemplateError, match=match):
        ChatTemplate.builtin("glm45").render(bad)


def test_template_source_precedence(tmp_path):
    official45 = builtin_source("glm45")
    custom = official45.replace("# Tools", "# Available tools")
    meta = {"tokenizer.chat_template": custom}
    assert ChatTemplate.for_model(None, "glm45").origin == "builtin"
    from_gguf = ChatTemplate.for_model(meta, "glm45")
    assert (from_gguf.origin, from_gguf.renderer) == ("gguf", "jinja")
    assert "# Available tools" in from_gguf.render([U1], [WEATHER])
    same = ChatTemplate.for_model({"tokenizer.chat_template": official45}, "glm45")
    assert (same.origin, same.renderer) == ("gguf", "native")
    not_glm = ChatTemplate.for_model({"tokenizer.chat_template": "{{ messages[0].content }}"}, "glm47")
    assert (not_glm.origin, not_glm.official) == ("builtin", True)
    path = tmp_path / "fixed.jinja"
    path.write_text(custom.replace("You may call", "Feel free to call"))
    from_file = ChatTemplate.for_model(meta, "glm45", override_path=path)
    assert from_file.origin == "file" and "Feel free to call" in from_file.render([U1], [WEATHER])
    with pytest.raises(TemplateError, match="cannot read"):
        ChatTemplate.for_model(meta, "glm45", override_path=tmp_path / "missing.jinja")
    with pytest.raises(TemplateError, match="unknown GLM chat family"):
        ChatTemplate.builtin("glm5")


@pytest.mark.parametrize("source,match", [
    ("{% for m in messages %}", "syntax error"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ ''.__class__.__base__ }}", "unsafe"),
    ("{% set _ = messages.append(1) %}x", "unsafe"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "budget"),
    ("{{ 'x' * 1000000000 }}", "oversized"),
    ("{{ 'x'.center(1000000000) }}", "oversized"),
    ("{{ '%0999999999d' % 1 }}", "oversized"),
    ("{{ '%*d' % (999999999, 1) }}", "oversized"),
    ("{{ 10 ** 100000 }}", "exponent"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed|failed"),
    ("{{ raise_exception('no system role') }}", "refused the conversation: no system role"),
    ("{{ messages[5].content }}", "failed to render|undefined"),
])
def test_hostile_or_broken_templates_become_typed_errors(source, match):
    with pytest.raises(TemplateError, match=match):
        tpl = ChatTemplate(source, "glm45")
        tpl.render([U1])


def test_sandbox_still_renders_ordinary_logic():
    tpl = ChatTemplate("{% for m in messages %}[{{ m.role }}:{{ m.content | upper }}]{% endfor %}"
                       "{{ tools | tojson }}{{ range(3) | list | length }}{{ '%-5s|' % 'ab' }}{{ '=' * 3 }}"
                       "{{ 'x'.center(5) }}", "glm47")
    assert tpl.render([U1], [WEATHER["function"]], add_generation_prompt=False).startswith("[user:WEATHER IN PARIS?][")


# ---------------------------------------------------------------- prefix stability

def _assistant_from_output(text, family, tools, starts_in_thinking):
    """Parse generated text back into the assistant message a client would send next turn."""
    p = StreamParser(family, tools, starts_in_thinking=starts_in_thinking)
    events = p.feed(text) + p.finish("stop")
    msg = {"role": "assistant",
           "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
           "reasoning_content": "".join(e.text for e in events if isinstance(e, ReasoningDelta)) or None,
           "tool_calls": [call(e.name, e.arguments, as_string=True, cid=e.id) for e in events
                          if isinstance(e, ToolCallEnd)]}
    return msg


REPLIES = {  # what each family's model writes after the generation prompt, per thinking mode
    ("glm45", True): ["\n<think>Sunny per forecast.</think>\nIt is sunny.",
                      ("\n<think>Need data.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
                      "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"),
                      "\n<think>Got it.</think>\nIt is 20C."],
    ("glm45", False): ["\nIt is sunny.", ("\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                       "</tool_call>"), "\nIt is 20C."],
    ("glm47", True): ["Sunny per forecast.</think>It is sunny.",
                      ("Need data.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                      "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"), "Got it.</think>It is 20C."],
    ("glm47", False): ["It is sunny.", ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                       "</tool_call>"), "It is 20C."],
}


def _conversation_prompts(family, thinking, clear_thinking):
    """Play user -> answer -> user -> tool call -> result -> answer -> user; yield (prompt, reply, next prompt)."""
    tpl = ChatTemplate.builtin(family)
    start = tpl.starts_in_thinking(thinking)
    answer, tool_reply, final = REPLIES[(family, thinking)]
    messages, steps = [U1], []
    for reply, follow in ((answer, U2), (tool_reply, T1), (final, {"role": "user", "content": "Bye"})):
        prompt = tpl.render(messages, [WEATHER], enable_thinking=thinking, clear_thinking=clear_thinking)
        messages = messages + [_assistant_from_output(reply, family, [WEATHER], start), follow]
        nxt = tpl.render(messages, [WEATHER], enable_thinking=thinking, clear_thinking=clear_thinking)
        steps.append((prompt, reply, nxt))
    return steps


@pytest.mark.parametrize("family,thinking,clear", [
    ("glm47", True, None), ("glm47", True, False), ("glm47", False, None), ("glm47", False, True),
    ("glm45", False, None), ("glm45", True, False),
])
def test_prefix_stable_across_turns(family, thinking, clear):
    for prompt, reply, nxt in _conversation_prompts(family, thinking, clear):
        assert nxt.startswith(prompt + reply), (prompt + reply)[-120:]


@pytest.mark.parametrize("family,clear", [("glm45", None), ("glm45", True), ("glm47", True)])
def test_dropping_old_reasoning_breaks_the_prefix(family, clear):
    """The documented limitation: the official GLM-4.5/4.6 behaviour (and clear_thinking=True) re-renders the
    last answer without its reasoning once a new user message arrives, so only that answer is re-read."""
    steps = _conversation_prompts(family, True, clear)
    prompt, reply, nxt = steps[0]
    assert not nxt.startswith(prompt + reply)
    head = prompt[: prompt.rindex("<|assistant|>") + len("<|assistant|>")]
    assert nxt.startswith(head)  # everything before the last answer is still reused
    # within a tool round-trip (no new user message) the reasoning is kept, so the prefix holds
    prompt, reply, nxt = steps[1]
    assert nxt.startswith(prompt + reply)


@pytest.mark.parametrize("family,thinking,clear", [("glm47", True, None), ("glm45", True, False),
                                                   ("glm45", False, None)])
def test_prefix_stable_at_token_level(gguf_factory, family, thinking, clear):
    """Text-level stability carries over to llama.cpp tokens (role and think tags are single tokens, so no BPE
    merge crosses a turn boundary): the engine can reuse the KV cache of prompt + reply."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(str(gguf_factory("tiny", "bf16")), vocab_only=True, verbose=False)

    def toks(text):
        return vocab.tokenize(text.encode(), add_bos=False, special=True)

    for prompt, reply, nxt in _conversation_prompts(family, thinking, clear):
        before = toks(prompt) + toks(reply)
        assert toks(nxt)[: len(before)] == before


def test_family_is_detected_from_the_official_templates():
    from glmlocal.glm.template import builtin_source, family_from_template

    assert family_from_template(builtin_source("glm47")) == "glm47"
    assert family_from_template(builtin_source("glm45")) == "glm45"
    assert family_from_template(None) == "glm45"
