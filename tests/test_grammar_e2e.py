"""Grammars in real llama.cpp: every generated GBNF parses, accepts the right texts and rejects wrong ones (the
shortest call glm/shortest.py sizes included), and sampling the random tiny GLM model with it through the engine,
thinking budget included, yields calls/JSON that the parser reads and the schema validates (without the grammar
the same model emits noise)."""

from __future__ import annotations

import ctypes
import json
import math

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
jsonschema = pytest.importorskip("jsonschema")

from glmlocal.engine.budget import ThinkBudget
from glmlocal.engine.engine import Engine
from glmlocal.engine.generation import Sampling
from glmlocal.glm.events import ContentDelta, ToolCallEnd
from glmlocal.glm.parser import StreamParser
from glmlocal.glm.shortest import shortest_call, worst_case_tokens
from glmlocal.glm.template import ChatTemplate
from glmlocal.glm.tools import json_schema_grammar, tool_call_grammar
from glmlocal.plan.planner import Placement
from tests.test_glm_tools import PYDANTIC_STYLE, WEATHER

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


@pytest.fixture(scope="module")
def engine(gguf_factory):
    with Engine.load(gguf_factory("tiny", "bf16"), Placement.cpu_only(ctx=2048, threads=2)) as eng:
        yield eng


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


def accepts(llm, grammar: str, text: str | list[int]) -> bool:
    """Whether llama.cpp's grammar sampler lets exactly `text` (or these tokens), then end-of-generation, through."""
    smpl = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    assert smpl, "grammar failed to parse"
    tokens = text if isinstance(text, list) else llm.tokenize(text.encode(), add_bos=False, special=True)
    try:
        for tok in tokens:
            if not _allowed(smpl, tok):
                return False
            llama_cpp.llama_sampler_accept(smpl, tok)
        return _allowed(smpl, llm.token_eos())  # end of generation only once the grammar is complete
    finally:
        llama_cpp.llama_sampler_free(smpl)


GRAMMAR_CASES = [(fam, choice, thinking) for fam in ("glm45", "glm47") for thinking in (False, True)
                 for choice in ("required", {"type": "function", "function": {"name": "lights"}})]


@pytest.mark.parametrize("family,choice,thinking", GRAMMAR_CASES)
def test_tool_grammars_parse_in_llama_cpp(llm, family, choice, thinking):
    for tools in (TOOLS, [FREE], TOOLS + [FREE]):
        if isinstance(choice, dict) and tools == [FREE]:
            continue
        g = tool_call_grammar(tools, family, choice, enable_thinking=thinking, parallel=True)
        assert parses(llm, g), g


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_the_shortest_call_is_accepted_and_its_bound_holds(llm, family):
    """glm/shortest.py's shortest call is a text the grammar accepts, and no tokenization of it is longer than
    its worst-case count; one byte less in a value is refused (it really is the shortest)."""
    for tool in (*TOOLS, FREE, WEATHER, *PYDANTIC_STYLE):
        fn = tool["function"]
        g = tool_call_grammar([tool], family, "required", enable_thinking=False)
        text = shortest_call(fn, family)
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert accepts(llm, g, ("\n" if family == "glm45" else "") + text), text
        assert len(tokens) <= worst_case_tokens(text)
    lights = shortest_call(LIGHTS["function"], family)
    assert not accepts(llm, tool_call_grammar([LIGHTS], family, "required", enable_thinking=False),
                       lights.replace(">hall<", ">hal<"))


def test_think_blocks_end_only_at_the_closing_token(llm):
    """The tags are tokens: `</think>` spelled in pieces, or a `<tool_call>` inside thinking, cannot end the block
    (the engine's budget counts on the token); GLM-4.5/4.6 may skip the block, GLM-4.7's prompt opened it."""
    call = ("<tool_call>lights<arg_key>on</arg_key><arg_value>true</arg_value><arg_key>room</arg_key>"
            "<arg_value>hall</arg_value></tool_call>")
    g47 = tool_call_grammar([LIGHTS], "glm47", "required", enable_thinking=True)
    assert accepts(llm, g47, "Plan: <b>x</b> </thin</think>" + call)
    pieces = [t for part in (b"Plan.</", b"think", b">") for t in llm.tokenize(part, add_bos=False, special=False)]
    assert llm.detokenize(pieces) == b"Plan.</think>" and not accepts(llm, g47, pieces + llm.tokenize(call.encode(), add_bos=False, special=True))
    assert not accepts(llm, g47, "Plan." + call)  # a call inside reasoning
    assert not accepts(llm, g47, "Plan.<tool_call>x</think>" + call)
    for role in ("<|assistant|>", "<|user|>", "<|system|>"):  # the parser would end the turn there
        assert not accepts(llm, g47, f"Plan.{role}more</think>" + call), role
    g45 = tool_call_grammar([LIGHTS], "glm45", "required", enable_thinking=True)
    call45 = ("<tool_call>lights\n<arg_key>on</arg_key>\n<arg_value>true</arg_value>\n<arg_key>room</arg_key>\n"
              "<arg_value>hall</arg_value>\n</tool_call>")
    assert accepts(llm, g45, "\n<think>Plan.</think>\n" + call45) and accepts(llm, g45, "\n" + call45)


def test_json_grammars_parse_in_llama_cpp(llm):
    for schema in (None, PARAMS["set_alarm"], {"type": "array", "items": {"type": "number"}},
                   {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": "string"}}}):
        assert parses(llm, json_schema_grammar(schema))
        assert parses(llm, json_schema_grammar(schema, family="glm47", enable_thinking=True))
    typed = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                                family="glm45", enable_thinking=True)
    assert accepts(llm, typed, '\n<think>Count.</think>\n{"n": 42}')
    assert not accepts(llm, typed, '\n<think>Count.</think>\n{"n": "42"}')
    assert accepts(llm, typed, '{"n": 42}')  # GLM-4.5/4.6 may skip the block (a spent budget bans it)
    assert not accepts(llm, typed, '{"n": 42}</think>')
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
        "string containing a role tag": good.replace("a.py", "a<|assistant|>.py"),
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


def _sample(engine: Engine, prompt: str, grammar: str | None, seed: int, max_tokens: int,
            think: int | None = None, starts_inside: bool = False):
    """Random sampling through the engine; `think`: a thinking budget (the random model never closes on its own)."""
    budget = None if think is None else ThinkBudget(engine.token_id("<think>"), engine.token_id("</think>"), think,
                                                    starts_inside, engine.token_id("<tool_call>"))
    outs = list(engine.generate(engine.tokenize(prompt), Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=seed),
                                grammar=grammar, max_tokens=max_tokens, think=budget))
    return "".join(o.text for o in outs), outs[-1].finish_reason


def _parse(text, family, tools, starts_in_thinking, reason):
    p = StreamParser(family, tools, starts_in_thinking=starts_in_thinking)
    return p.feed(text) + p.finish(reason)


@pytest.mark.slow  # samples hundreds of tokens; minutes when the machine is busy
@pytest.mark.parametrize("family,thinking", [("glm45", False), ("glm47", False), ("glm45", True), ("glm47", True)])
def test_forced_tool_call_from_random_model(engine, family, thinking):
    tpl = ChatTemplate.builtin(family)
    prompt = tpl.render([{"role": "user", "content": "Wake me at 7 and dim the lights."}], TOOLS,
                        enable_thinking=thinking)
    start = tpl.starts_in_thinking(thinking)
    for i, seed in enumerate(SEEDS):
        choice = "required" if i % 2 == 0 else {"type": "function", "function": {"name": "set_alarm"}}
        grammar = tool_call_grammar(TOOLS, family, choice, enable_thinking=thinking)
        text, reason = _sample(engine, prompt, grammar, seed, max_tokens=400, think=12, starts_inside=start)
        events = _parse(text, family, TOOLS, start, reason)
        calls = [e for e in events if isinstance(e, ToolCallEnd)]
        assert reason == "stop" and len(calls) == 1, text
        assert events[-1].reason == "tool_calls"
        if isinstance(choice, dict):
            assert calls[0].name == "set_alarm"
        jsonschema.validate(calls[0].arguments, PARAMS[calls[0].name])
        assert not any(isinstance(e, ContentDelta) for e in events), text


@pytest.mark.slow  # samples hundreds of tokens; minutes when the machine is busy
def test_without_grammar_the_random_model_emits_noise(engine):
    tpl = ChatTemplate.builtin("glm47")
    prompt = tpl.render([{"role": "user", "content": "Wake me at 7."}], TOOLS, enable_thinking=False)
    for seed in SEEDS:
        text, _ = _sample(engine, prompt, None, seed, max_tokens=60)
        events = _parse(text, "glm47", TOOLS, False, "length")
        assert not any(isinstance(e, ToolCallEnd) for e in events), text


@pytest.mark.slow  # samples hundreds of tokens; minutes when the machine is busy
@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_forced_json_answer_from_random_model(engine, family):
    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "name": {"type": "string", "maxLength": 5}},
        "required": ["ok", "n"], "additionalProperties": False}
    tpl = ChatTemplate.builtin(family)
    prompt = tpl.render([{"role": "user", "content": "Answer in JSON."}], enable_thinking=False)
    grammar = json_schema_grammar(schema, family=family, enable_thinking=False)
    for seed in SEEDS[:3]:
        text, reason = _sample(engine, prompt, grammar, seed, max_tokens=300)
        events = _parse(text, family, None, False, reason)
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        assert reason == "stop", text
        jsonschema.validate(json.loads(content), schema)
        noise, _ = _sample(engine, prompt, None, seed, max_tokens=60)
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(noise), schema)
