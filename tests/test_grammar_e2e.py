"""Grammars in real llama.cpp: every generated GBNF parses, accepts the right texts and rejects wrong ones, and
sampling the random tiny GLM model with it yields calls/JSON that the parser reads and the schema validates
(without the grammar the same model emits noise)."""

from __future__ import annotations

import ctypes
import json
import math

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
jsonschema = pytest.importorskip("jsonschema")

from glmlocal.glm.events import ContentDelta, ToolCallEnd
from glmlocal.glm.parser import StreamParser
from glmlocal.glm.template import ChatTemplate
from glmlocal.glm.tools import json_schema_grammar, tool_call_grammar
from tests.test_glm_tools import PYDANTIC_STYLE

# Bounded schemas: a random model only stops a free-text value by luck, so the sampled tools bound every string.
ALARM = {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": {
    "type": "object", "properties": {
        "hour": {"type": "integer"}, "label": {"type": "string", "maxLength": 6},
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "sun"]}, "maxItems": 3},
        "loud": {"type": "boolean"}, "tone": {"enum": ["beep", "chime"]},
        "snooze": {"type": "object", "properties": {"minutes": {"type": "integer"}, "max": {"type": "number"}},
                   "required": ["minutes"], "additionalProperties": False},
        "note": {"type": ["string", "null"], "maxLength": 4}},
    "required": ["hour", "tone"]}}}
LIGHTS = {"type": "function", "function": {"name": "lights", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["hall", "attic"]}},
    "required": ["on", "room"]}}}
TOOLS = [ALARM, LIGHTS]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
FREE = {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"}, "any": {}},
    "required": ["path"]}}}
SEEDS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def llm(gguf_factory):
    path = gguf_factory("tiny", "bf16")  # the grammar does not depend on the quant; bf16 runs on any CPU build
    return llama_cpp.Llama(str(path), n_ctx=2048, n_threads=2, n_batch=256, verbose=False, seed=0)


def parses(llm, grammar: str) -> bool:
    smpl = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    if not smpl:
        return False
    llama_cpp.llama_sampler_free(smpl)
    return True


def _allowed(smpl, token: int) -> bool:
    data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    arr = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
    return not math.isinf(data[0].logit)


def accepts(llm, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets exactly `text` (then end-of-generation) through."""
    smpl = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    assert smpl, "grammar failed to parse"
    try:
        for tok in llm.tokenize(text.encode(), add_bos=False, special=True):
            if not _allowed(smpl, tok):
                return False
            llama_cpp.llama_sampler_accept(smpl, tok)
        return _allowed(smpl, llm.token_eos())  # end of generation only once the grammar is complete
    finally:
        llama_cpp.llama_sampler_free(smpl)


GRAMMAR_CASES = [(fam, choice, thinking, budget)
                 for fam in ("glm45", "glm47") for thinking in (False, True) for budget in (None, 16)
                 for choice in ("required", {"type": "function", "function": {"name": "lights"}})]


@pytest.mark.parametrize("family,choice,thinking,budget", GRAMMAR_CASES)
def test_tool_grammars_parse_in_llama_cpp(llm, family, choice, thinking, budget):
    for tools in (TOOLS, [FREE], TOOLS + [FREE]):
        if isinstance(choice, dict) and tools == [FREE]:
            continue
        g = tool_call_grammar(tools, family, choice, enable_thinking=thinking, think_budget=budget, parallel=True)
        assert parses(llm, g), g


def test_json_grammars_parse_in_llama_cpp(llm):
    for schema in (None, PARAMS["set_alarm"], {"type": "array", "items": {"type": "number"}},
                   {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": "string"}}}):
        assert parses(llm, json_schema_grammar(schema))
        assert parses(llm, json_schema_grammar(schema, family="glm47", enable_thinking=True))
    typed = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                                family="glm45", enable_thinking=True)
    assert accepts(llm, typed, '\n<think>Count.</think>\n{"n": 42}')
    assert not accepts(llm, typed, '\n<think>Count.</think>\n{"n": "42"}')
    assert not accepts(llm, typed, '{"n": 42}')  # the think block comes first when thinking is on
    assert not parses(llm, "root ::= undefined-rule")  # the probe itself can tell a broken grammar
    assert not parses(llm, "root ::= [a-")


def test_grammar_accepts_valid_and_rejects_invalid_calls(llm):
    g45 = tool_call_grammar([FREE, LIGHTS], "glm45", "required", enable_thinking=False)
    good = ("\n<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>a.py</arg_value>\n<arg_key>content</arg_key>"
            "\n<arg_value>if a < b:\n    print(\"</arg\")\n</arg_value>\n<arg_key>mode</arg_key>\n<arg_value>420"
            "</arg_value>\n</tool_call>")
    assert accepts(llm, g45, good)
    assert accepts(llm, g45, "\n<tool_call>lights\n<arg_key>on</arg_key>\n<arg_value>true</arg_value>\n"
                             "<arg_key>room</arg_key>\n<arg_value>attic</arg_value>\n</tool_call>")
    bad = {
        "string containing the closing tag": good.replace("a.py", "a</arg_value>"),
        "integer given as text": good.replace("420", "rw"),
        "missing required argument": "\n<tool_call>lights\n<arg_key>on</arg_key>\n<arg_value>true</arg_value>\n</tool_call>",
        "value outside the enum": "\n<tool_call>lights\n<arg_key>on</arg_key>\n<arg_value>true</arg_value>\n"
                                  "<arg_key>room</arg_key>\n<arg_value>roof</arg_value>\n</tool_call>",
        "unknown tool": "\n<tool_call>launch\n</tool_call>",
        "compact 4.7 layout under 4.5": good.replace("\n", ""),
        "plain answer": "Sure, here you go.",
        "unfinished call": good[:-12],
    }
    for why, text in bad.items():
        assert not accepts(llm, g45, text), why
    two = ("\n<tool_call>lights\n<arg_key>on</arg_key>\n<arg_value>false</arg_value>\n<arg_key>room</arg_key>\n"
           "<arg_value>hall</arg_value>\n</tool_call>")
    assert not accepts(llm, g45, two + two)  # one call unless parallel calls are allowed
    assert accepts(llm, tool_call_grammar([FREE, LIGHTS], "glm45", "required", enable_thinking=False,
                                          parallel=True), two + two)
    refs = tool_call_grammar(PYDANTIC_STYLE, "glm47", "required", enable_thinking=False)
    assert accepts(llm, refs, '<tool_call>order<arg_key>item</arg_key><arg_value>{"sku": 7}</arg_value>'
                              '<arg_key>color</arg_key><arg_value>red</arg_value></tool_call>')
    assert accepts(llm, refs, "<tool_call>label<arg_key>item</arg_key><arg_value>abc</arg_value></tool_call>")
    assert not accepts(llm, refs, '<tool_call>label<arg_key>item</arg_key><arg_value>{"sku": 7}</arg_value>'
                                  "</tool_call>")  # each tool keeps its own Item
    g47 = tool_call_grammar([LIGHTS], "glm47", "required", enable_thinking=True)
    assert accepts(llm, g47, "Turn on the attic.</think><tool_call>lights<arg_key>on</arg_key><arg_value>true"
                             "</arg_value><arg_key>room</arg_key><arg_value>attic</arg_value></tool_call>")
    assert not accepts(llm, g47, "<tool_call>lights<arg_key>on</arg_key><arg_value>true</arg_value>"
                                 "<arg_key>room</arg_key><arg_value>attic</arg_value></tool_call>")  # think first


def _sample(llm, prompt: str, grammar: str | None, seed: int, max_tokens: int):
    kw = {"grammar": llama_cpp.LlamaGrammar.from_string(grammar)} if grammar else {}
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                seed=seed, **kw)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


def _parse(text, family, tools, starts_in_thinking, reason):
    p = StreamParser(family, tools, starts_in_thinking=starts_in_thinking)
    return p.feed(text) + p.finish(reason)


@pytest.mark.slow  # samples hundreds of tokens; minutes when the machine is busy
@pytest.mark.parametrize("family,thinking", [("glm45", False), ("glm47", False), ("glm45", True), ("glm47", True)])
def test_forced_tool_call_from_random_model(llm, family, thinking):
    tpl = ChatTemplate.builtin(family)
    prompt = tpl.render([{"role": "user", "content": "Wake me at 7 and dim the lights."}], TOOLS,
                        enable_thinking=thinking)
    start = tpl.starts_in_thinking(thinking)
    for i, seed in enumerate(SEEDS):
        choice = "required" if i % 2 == 0 else {"type": "function", "function": {"name": "set_alarm"}}
        grammar = tool_call_grammar(TOOLS, family, choice, enable_thinking=thinking, think_budget=12)
        text, reason = _sample(llm, prompt, grammar, seed, max_tokens=400)
        events = _parse(text, family, TOOLS, start, reason)
        calls = [e for e in events if isinstance(e, ToolCallEnd)]
        assert reason == "stop" and len(calls) == 1, text
        assert events[-1].reason == "tool_calls"
        if isinstance(choice, dict):
            assert calls[0].name == "set_alarm"
        jsonschema.validate(calls[0].arguments, PARAMS[calls[0].name])
        assert not any(isinstance(e, ContentDelta) for e in events), text


@pytest.mark.slow  # samples hundreds of tokens; minutes when the machine is busy
def test_without_grammar_the_random_model_emits_noise(llm):
    tpl = ChatTemplate.builtin("glm47")
    prompt = tpl.render([{"role": "user", "content": "Wake me at 7."}], TOOLS, enable_thinking=False)
    for seed in SEEDS:
        text, _ = _sample(llm, prompt, None, seed, max_tokens=60)
        events = _parse(text, "glm47", TOOLS, False, "length")
        assert not any(isinstance(e, ToolCallEnd) for e in events), text


@pytest.mark.slow  # samples hundreds of tokens; minutes when the machine is busy
@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_forced_json_answer_from_random_model(llm, family):
    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "name": {"type": "string", "maxLength": 5}},
        "required": ["ok", "n"], "additionalProperties": False}
    tpl = ChatTemplate.builtin(family)
    prompt = tpl.render([{"role": "user", "content": "Answer in JSON."}], enable_thinking=False)
    grammar = json_schema_grammar(schema, family=family, enable_thinking=False)
    for seed in SEEDS[:3]:
        text, reason = _sample(llm, prompt, grammar, seed, max_tokens=300)
        events = _parse(text, family, None, False, reason)
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        assert reason == "stop", text
        jsonschema.validate(json.loads(content), schema)
        noise, _ = _sample(llm, prompt, None, seed, max_tokens=60)
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(noise), schema)
