"""Thinking per wire API: whether a turn thinks, and its budget in tokens (the engine enforces it, to the token:
engine/budget.py; a forced tool call caps it further so the call has room: engine/session.py `think_limit`).

Each API's own semantics (`serve --thinking request`, the default):
- Anthropic Messages: no `thinking` field -> no thinking (the prompt is rendered with enable_thinking=False,
  token for token the official template's); `{"type": "enabled", "budget_tokens": N}` -> thinking, at most N
  tokens; `"adaptive"` -> thinking without a budget; `"disabled"` -> none. Anthropic's own rule holds: 400 unless
  budget_tokens < max_tokens. Its minimum of 1024 does not: locally a smaller budget is how one bounds a slow
  model, so any whole number from 1 is accepted.
- OpenAI Chat Completions and Responses: GLM's default, thinking on without a budget (as vLLM and SGLang serve
  GLM), unless the request says otherwise. `reasoning_effort` (Responses: `reasoning.effort`): none / minimal ->
  off; low / medium / high -> EFFORT_BUDGETS; xhigh -> on, no budget. `chat_template_kwargs.enable_thinking`
  wins over the effort (as before); `chat_template_kwargs.thinking_budget` (an extension) over its budget. On
  Chat Completions z.ai's `thinking: {"type": "enabled" | "disabled"}` works too.
- `serve --thinking on|off` overrides every request (for clients that cannot say); `serve --think-budget N` is
  the budget of a thinking turn whose request names none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glmlocal.errors import InputError
from glmlocal.server.errors import APIError

# Effort -> budget. low is Anthropic's smallest budget (room for a short plan); each step up is 4x, so at local
# decode speeds (roughly 10-40 tokens/s for these models) low thinks for under two minutes, medium for a few,
# high for up to half an hour on a hard problem, and each still ends; xhigh leaves GLM unbounded, as by default.
EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": None}
EFFORT_OFF = ("none", "minimal")
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
Mode = Literal["on", "off", "request"]


@dataclass(frozen=True)
class ThinkingPolicy:
    """The server's say: `mode` "request" honours each request (and each API's default), "on" / "off" force it;
    `budget` is the budget of a thinking turn whose request names none (None: unbounded)."""

    mode: Mode = "request"
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("on", "off", "request"):
            raise InputError(f"--thinking must be on, off or request, got {self.mode!r}")
        if self.budget is not None and self.budget < 1:
            raise InputError(f"--think-budget must be at least 1 token, got {self.budget}")

    def apply(self, enabled: bool, budget: int | None) -> tuple[bool, int | None]:
        """(thinks, budget) for a turn whose request asked for `enabled` with `budget`."""
        if self.mode != "request":
            enabled = self.mode == "on"
        if not enabled:
            return False, None
        return True, self.budget if budget is None else budget


def budget_of(value: object, param: str) -> int:
    """A budget from a request: a whole number of tokens, at least 1 (else a 400 naming `param`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, f"{param} must be a whole number of tokens, at least 1; got {value!r}", param=param)
    return value


def effort(value: str | None) -> tuple[bool | None, int | None]:
    """(thinks, budget) an OpenAI reasoning effort asks for ((None, None): it says nothing)."""
    if value is None:
        return None, None
    if value in EFFORT_OFF:
        return False, None
    return True, EFFORT_BUDGETS[value]


def openai_thinking(policy: ThinkingPolicy, *, effort_value: str | None, kwargs: dict[str, object] | None,
                    enabled: bool | None = None) -> tuple[bool, int | None]:
    """(thinks, budget) of an OpenAI-style request: GLM's default (on), an explicit switch the route has
    (`enabled`: z.ai's `thinking`), the effort, then chat_template_kwargs, each overriding the one before."""
    by_effort, budget = effort(effort_value)
    on = enabled if by_effort is None else by_effort
    kwargs = kwargs or {}
    if "enable_thinking" in kwargs:
        on = bool(kwargs["enable_thinking"])
    if kwargs.get("thinking_budget") is not None:
        budget = budget_of(kwargs["thinking_budget"], "chat_template_kwargs.thinking_budget")
    return policy.apply(True if on is None else on, budget)


def anthropic_thinking(policy: ThinkingPolicy, kind: str | None, budget_tokens: object,
                       max_tokens: int | None) -> tuple[bool, int | None]:
    """(thinks, budget) of a Messages request's `thinking` (`kind` None: the field is absent -> no thinking).
    `max_tokens` None (count_tokens) skips Anthropic's budget_tokens < max_tokens rule."""
    if kind != "enabled":
        return policy.apply(kind == "adaptive", None)
    if budget_tokens is None:
        raise APIError(400, "thinking.budget_tokens: Field required (thinking of type enabled needs a budget)",
                       param="thinking.budget_tokens")
    budget = budget_of(budget_tokens, "thinking.budget_tokens")
    if max_tokens is not None and budget >= max_tokens:
        raise APIError(400, f"max_tokens must be greater than thinking.budget_tokens (got max_tokens {max_tokens}, "
                       f"budget_tokens {budget})", param="max_tokens")
    return policy.apply(True, budget)
