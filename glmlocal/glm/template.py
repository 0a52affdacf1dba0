"""GLM chat templates: where the template comes from, input normalisation, and rendering.

Template source, in order of precedence (`ChatTemplate.for_model`):
1. a user-supplied file (`override_path`, e.g. a community-fixed template);
2. the GGUF's own `tokenizer.chat_template`, if it is a GLM template (it has `<|assistant|>` and `<arg_key>`);
3. the built-in official template of the family (glmlocal/templates: GLM-4.6.jinja for "glm45" = GLM-4.5,
   4.5-Air, 4.6; GLM-4.7.jinja for "glm47").
Every source is untrusted and rendered in a hardened Jinja sandbox (glm/sandbox.py).

Which renderer runs: when the source is byte-identical to the family's official template we render with the
native Python renderer (glm/native.py), which the parity table proves identical to the Jinja output; it is
several times faster (bench/glm_template.py) and supports the prefix-stable GLM-4.5/4.6 mode
(`clear_thinking=False`, see below). Any other
source (a fixed or customised template) is rendered by Jinja, because only it knows what that template does.

`clear_thinking` (preserved thinking): None means the model family's default as llama.cpp serves it: GLM-4.7
keeps all past reasoning (llama.cpp passes clear_thinking=false), GLM-4.5/4.6 drops reasoning before the last
user message (its template cannot keep it). True drops old reasoning for both. False keeps it for both; for
GLM-4.5/4.6 that goes beyond the official template (native renderer only) and is what keeps its prompts
prefix-stable across turns, so the KV cache is reused.

Prefix stability (turn N+1's prompt starts with turn N's prompt + the reply as generated) holds when the reply
is in the template's canonical form, which is how the models write. Where it cannot hold:
- reasoning is dropped (GLM-4.5/4.6 by default, or clear_thinking=True): once a new user message arrives the
  previous answer is re-rendered without its reasoning, so that one answer is re-read (everything before it is
  still reused). Within a tool round-trip (no new user message) reasoning is kept and the prefix holds.
  clear_thinking=False makes both families fully stable.
- GLM-4.5/4.6 with enable_thinking toggled between turns: "/nothink" is added to or removed from every past
  user message.
- whitespace the templates strip (around reasoning and content) and non-canonical JSON in non-string tool
  arguments (`{"a":1}` is re-rendered as `{"a": 1}`) are re-rendered differently; the parser already reports
  them the way the template will render them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path

from glmlocal.errors import TemplateError
from glmlocal.glm import native
from glmlocal.glm.sandbox import compile_template, render_template

FAMILIES = ("glm45", "glm47")
BUILTIN_FILES = {"glm45": "GLM-4.6.jinja", "glm47": "GLM-4.7.jinja"}
ROLES = ("system", "user", "assistant", "tool")
TEXT_PARTS = ("text", "input_text", "output_text")  # OpenAI content part types that carry text
IMAGE_PARTS = ("image_url", "input_image", "image")


def builtin_source(family: str) -> str:
    """The official template text shipped with glmlocal for `family`."""
    _check_family(family)
    return resources.files("glmlocal").joinpath("templates", BUILTIN_FILES[family]).read_text(encoding="utf-8")


def is_glm_template(source: str | None) -> bool:
    """True for templates that speak GLM-4.5+'s protocol (role tokens and XML tool arguments)."""
    return bool(source) and "<|assistant|>" in source and "<arg_key>" in source


def family_from_template(source: str | None) -> str:
    """The chat family a GLM template belongs to: GLM-4.7's knows `clear_thinking` (preserved thinking)
    and opens the think block in its generation prompt; GLM-4.5/4.5-Air/4.6's does neither."""
    return "glm47" if source and "clear_thinking" in source else "glm45"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise TemplateError(f"unknown GLM chat family {family!r}", hint=f"use one of {', '.join(FAMILIES)}")


class ChatTemplate:
    """A GLM chat template bound to a family ("glm45" or "glm47")."""

    def __init__(self, source_text: str, family: str, *, origin: str = "custom"):
        _check_family(family)
        if not isinstance(source_text, str) or not source_text.strip():
            raise TemplateError("chat template is empty")
        self.source = source_text
        self.family = family
        self.origin = origin  # "builtin" | "gguf" | "file" | "custom"
        self.official = source_text.strip() == builtin_source(family).strip()
        self._compiled = compile_template(source_text)  # syntax errors surface now, not mid-conversation

    @classmethod
    def builtin(cls, family: str) -> ChatTemplate:
        return cls(builtin_source(family), family, origin="builtin")

    @classmethod
    def for_model(cls, gguf_metadata: Mapping[str, object] | None, family: str,
                  override_path: str | Path | None = None) -> ChatTemplate:
        """Pick the template for a model: user file, else the GGUF's GLM template, else the built-in one."""
        if override_path is not None:
            path = Path(override_path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(f"cannot read chat template {path}: {exc}") from None
            return cls(text, family, origin="file")
        embedded = (gguf_metadata or {}).get("tokenizer.chat_template")
        if isinstance(embedded, str) and is_glm_template(embedded):
            return cls(embedded, family, origin="gguf")
        return cls.builtin(family)

    @property
    def renderer(self) -> str:
        """"native" when the source is the official template, else "jinja"."""
        return "native" if self.official else "jinja"

    def render(self, messages: Iterable[Mapping[str, object]], tools: list[Mapping[str, object]] | None = None, *,
               add_generation_prompt: bool = True, enable_thinking: bool = True,
               clear_thinking: bool | None = None, renderer: str | None = None) -> str:
        """The prompt text for `messages` (OpenAI chat format) and OpenAI-format `tools`.

        `renderer` forces "native" or "jinja" (tests use it); by default see `self.renderer`.
        """
        msgs = normalize_messages(messages)
        tool_list = normalize_tools(tools)
        keep = _keep_reasoning(self.family, clear_thinking)
        use = renderer or self.renderer
        if use == "native":
            if not self.official:
                raise TemplateError("the native renderer only reproduces the official templates")
            return native.render_native(msgs, tool_list, self.family, add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking, keep_reasoning=keep)
        variables: dict[str, object] = {
            "messages": msgs, "tools": tool_list or None, "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking, "bos_token": "[gMASK]", "eos_token": "<|endoftext|>"}
        if clear_thinking is not None or self.family == "glm47":
            variables["clear_thinking"] = not keep
        return render_template(self._compiled, variables)

    def generation_prompt(self, enable_thinking: bool = True) -> str:
        """The text the template appends for the model's turn (e.g. "<|assistant|><think>" for GLM-4.7)."""
        return self._generation_prompts[bool(enable_thinking)]

    def starts_in_thinking(self, enable_thinking: bool = True) -> bool:
        """Whether the model's output begins inside a <think> block (the prompt ends with an open <think>)."""
        return self.generation_prompt(enable_thinking).endswith("<think>")

    @cached_property
    def _generation_prompts(self) -> dict[bool, str]:
        probe = [{"role": "user", "content": "x"}]
        out = {}
        for thinking in (True, False):
            with_gen = self.render(probe, enable_thinking=thinking)
            without = self.render(probe, add_generation_prompt=False, enable_thinking=thinking)
            if not with_gen.startswith(without):
                raise TemplateError("chat template's generation prompt is not a suffix of the conversation")
            out[thinking] = with_gen[len(without):]
        return out


def _keep_reasoning(family: str, clear_thinking: bool | None) -> bool:
    if clear_thinking is None:
        return family == "glm47"
    return not clear_thinking


# ---------------------------------------------------------------- normalisation

def content_text(content: object, *, sep: str = "", image: str | None = None) -> str:
    """Text of a message content: a string, None, or a list of parts (strings, {"type": "text", "text": ...},
    a part without a type that has "text"), joined with `sep`. Image parts become `image` (None: dropped),
    other parts are dropped. The one content flattener: the chat, the server and the renderers use it."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TemplateError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    texts = [_part_text(part, image) for part in content]
    return sep.join(t for t in texts if t is not None)


def _part_text(part: object, image: str | None) -> str | None:
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        return None
    kind = part.get("type", "text")
    if kind in TEXT_PARTS:
        return str(part.get("text") or "")
    return image if kind in IMAGE_PARTS else None


def parse_arguments(arguments: object) -> dict:
    """Tool call arguments as a mapping; OpenAI sends a JSON string, the templates need a mapping."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise TemplateError(f"tool call arguments are not valid JSON: {exc.msg}") from None
    if not isinstance(arguments, Mapping):
        raise TemplateError(f"tool call arguments must be a JSON object, got {type(arguments).__name__}")
    return dict(arguments)


def _normalize_call(call: object) -> dict:
    if not isinstance(call, Mapping):
        raise TemplateError("each tool call must be an object")
    fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise TemplateError("tool call without a function name")
    return {"name": name, "arguments": parse_arguments(fn.get("arguments"))}


def _normalize_message(m: object) -> dict:
    if not isinstance(m, Mapping):
        raise TemplateError("each message must be an object with a 'role'")
    role = m.get("role")
    role = "system" if role == "developer" else role
    if role not in ROLES:
        raise TemplateError(f"unknown message role {role!r}", hint="use system, user, assistant or tool")
    out: dict[str, object] = {"role": role, "content": content_text(m.get("content"))}
    if role == "assistant":
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if reasoning is not None:
            out["reasoning_content"] = content_text(reasoning)
        calls = m.get("tool_calls") or []
        out["tool_calls"] = [_normalize_call(c) for c in calls]
    return out


def normalize_messages(messages: Iterable[Mapping[str, object]]) -> list[dict]:
    """Messages in the shape both renderers expect: roles checked, text as strings, arguments as mappings."""
    if isinstance(messages, (str, bytes)) or messages is None:
        raise TemplateError("messages must be a list of message objects")
    return [_normalize_message(m) for m in messages]


def normalize_tools(tools: object) -> list[dict]:
    """OpenAI-format tools; bare function objects ({"name", "parameters"}) are wrapped as type "function"."""
    if not tools:
        return []
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise TemplateError("each tool must be an object")
        if "function" in tool:
            fn = tool["function"]
            wrapped = dict(tool)
        else:
            fn = tool
            wrapped = {"type": "function", "function": dict(tool)}
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TemplateError("each tool needs a function with a name")
        out.append(wrapped)
    return out
