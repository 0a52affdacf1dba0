"""Native (no Jinja) renderers of the official GLM templates, one per family.

`render_glm45` reproduces templates/GLM-4.6.jinja (GLM-4.5, 4.5-Air, 4.6) and `render_glm47` reproduces
templates/GLM-4.7.jinja byte for byte (tests/test_glm_template.py holds the parity table). They take
*normalised* messages (see template.normalize_messages). One extension the official 4.6 template lacks:
`keep_reasoning=True` re-renders every past reasoning block, which is what makes GLM-4.5/4.6 prompts
prefix-stable across turns (the official template drops reasoning before the last user message).
"""

from __future__ import annotations

import json

TOOLS_INTRO = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FORMAT = {
    "glm45": "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>",
    "glm47": "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>",
}
PREFIX = "[gMASK]<sop>"


def tojson(value: object) -> str:
    """The templates' `tojson(ensure_ascii=False)`."""
    return json.dumps(value, ensure_ascii=False)


def arg_text(value: object) -> str:
    """How a tool-call argument value is written inside <arg_value>: strings raw, anything else as JSON."""
    return value if isinstance(value, str) else tojson(value)


def tools_block(tools: list[dict] | None, family: str) -> str:
    if not tools:
        return ""
    lines = "".join(tojson(t) + "\n" for t in tools)
    return (f"{TOOLS_INTRO}{lines}</tools>\n\nFor each function call, output the function name and arguments "
            f"within the following XML format:\n{TOOLS_FORMAT[family]}")


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, content) the way the templates derive them, including '<think>' inlined in content."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        head = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return head, content.split("</think>")[-1].lstrip("\n")
    return "", content


def _tool_call_glm45(call: dict) -> str:
    out = "\n<tool_call>" + call["name"] + "\n"
    for key, value in call["arguments"].items():
        out += f"<arg_key>{key}</arg_key>\n<arg_value>{arg_text(value)}</arg_value>\n"
    return out + "</tool_call>"


def _tool_call_glm47(call: dict) -> str:
    args = "".join(f"<arg_key>{k}</arg_key><arg_value>{arg_text(v)}</arg_value>" for k, v in call["arguments"].items())
    return "<tool_call>" + call["name"] + args + "</tool_call>"


def _tool_message(messages: list[dict], i: int, family: str) -> str:
    m = messages[i]
    opener = "<|observation|>" if i == 0 or messages[i - 1]["role"] != "tool" else ""
    if family == "glm45":
        return f"{opener}\n<tool_response>\n{m['content']}\n</tool_response>"
    return f"{opener}<tool_response>{m['content']}</tool_response>"


def _assistant(m: dict, show_reasoning: bool, family: str) -> str:
    reasoning, content = split_reasoning(m)
    nl = "\n" if family == "glm45" else ""
    if show_reasoning and reasoning:
        out = f"<|assistant|>{nl}<think>{reasoning.strip()}</think>"
    else:
        out = "<|assistant|>\n<think></think>" if family == "glm45" else "<|assistant|></think>"
    if content.strip():
        out += nl + content.strip()
    render_call = _tool_call_glm45 if family == "glm45" else _tool_call_glm47
    return out + "".join(render_call(tc) for tc in m.get("tool_calls") or [])


def render_native(messages: list[dict], tools: list[dict] | None, family: str, *, add_generation_prompt: bool,
                  enable_thinking: bool, keep_reasoning: bool) -> str:
    """Render normalised messages exactly as the family's official template does (see module doc)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    nl = "\n" if family == "glm45" else ""
    out = [PREFIX, tools_block(tools, family)]
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            text = m["content"]
            nothink = family == "glm45" and not enable_thinking and not text.endswith("/nothink")
            out.append(f"<|user|>{nl}{text}" + ("/nothink" if nothink else ""))
        elif role == "assistant":
            out.append(_assistant(m, keep_reasoning or i > last_user, family))
        elif role == "tool":
            out.append(_tool_message(messages, i, family))
        elif role == "system":
            out.append(f"<|system|>{nl}{m['content']}")
    if add_generation_prompt:
        out.append(generation_prompt(family, enable_thinking))
    return "".join(out)


def generation_prompt(family: str, enable_thinking: bool) -> str:
    """What the official template appends for the model's turn."""
    if family == "glm45":
        return "<|assistant|>" if enable_thinking else "<|assistant|>\n<think></think>"
    return "<|assistant|><think>" if enable_thinking else "<|assistant|></think>"
