"""Render chat templates (the GGUF's own, a user file, or the built-in official ones) in a hardened Jinja sandbox.

The environment mirrors what transformers' `apply_chat_template` and llama.cpp's jinja engine do
(`trim_blocks` and `lstrip_blocks`, a `tojson` that takes `ensure_ascii`, `raise_exception`, loop controls), on
top of jinja2's ImmutableSandboxedEnvironment (no attribute escapes, no mutation of inputs). A template is
untrusted input, so rendering is also bounded: `range()` and `*` draw on a per-render budget, output is capped,
and every failure (syntax, security, `raise_exception`, recursion) becomes a TemplateError.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import jinja2
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmlocal.errors import TemplateError

MAX_OUTPUT_CHARS = 64 * 1024 * 1024  # a prompt far beyond any context window
MAX_ITERATIONS = 1_000_000  # range() items and repetition sizes per render
MAX_SEQUENCE = 1024 * 1024  # largest string/list a template may build with *, %, or a padding method


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_ITERATIONS

    def spend(self, n: int) -> None:
        self.left -= max(0, n)
        if self.left < 0:
            raise TemplateError("chat template exceeded its work budget (runaway loop?)")


_WIDE_FORMAT = re.compile(r"%[-+ #0]*\*|%[-+ #0]*\d{7,}|%[-+ #0]*\d*\.\d{7,}")


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """Sandbox that also bounds what can allocate without limit: `*`, `**`, `%` and huge integer arguments
    (str.center(10**9), "x".zfill(...), ...)."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def call(self, context: Context, obj: object, /, *args: object, **kwargs: object) -> object:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SEQUENCE:
                raise TemplateError("chat template passes an oversized number to a function")
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: object, right: object) -> object:
        if operator == "%":
            if isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise TemplateError("chat template uses an oversized format width")
            return left % right
        if operator == "**":
            if isinstance(right, int) and abs(right) > 64:
                raise TemplateError("chat template exponent too large")
            return left**right
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                raise TemplateError("chat template builds an oversized value")
        return left * right


def _tojson(value: object, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Same semantics as transformers' and llama.cpp's tojson (jinja2's own HTML-escapes "<" and rejects kwargs).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """Compile `source` in the guarded sandbox; a syntax error becomes TemplateError."""
    env = _GuardedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None


def render_template(template: jinja2.Template, variables: dict[str, object]) -> str:
    """Render with a fresh work budget; output and work are bounded, all failures become TemplateError."""
    budget = _Budget()

    def bounded_range(*args: int) -> range:
        r = range(*args)
        budget.spend(len(r))
        return r

    parts: list[str] = []
    size = 0
    try:
        for chunk in template.generate(**variables, range=bounded_range):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateError("chat template output exceeds the size limit")
            parts.append(chunk)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"chat template tried an unsafe operation: {exc}") from None
    except RecursionError:
        raise TemplateError("chat template recursed too deeply") from None
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError,
            ZeroDivisionError, OverflowError) as exc:
        raise TemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None
    return "".join(parts)
