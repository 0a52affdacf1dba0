"""Typed errors. Each carries fields; the CLI turns any GlmlocalError into one actionable line."""

from __future__ import annotations

from quantize.errors import ConversionError, DiskSpaceError, InputError, ToolError

__all__ = ["ConversionError", "ContextOverflowError", "DiskSpaceError", "EngineError", "GlmlocalError", "HubError",
           "InputError", "PlanError", "RepoNotFoundError", "TemplateError"]


# The hierarchy's root and the errors the converter raises live in quantize (which stands alone); everything
# glmlocal raises derives from the same root, so `except GlmlocalError` catches a conversion failure too.
GlmlocalError = ToolError


class PlanError(GlmlocalError):
    """The model does not fit the (given or probed) hardware."""


class EngineError(GlmlocalError):
    """llama.cpp failed to load or run the model."""


class HubError(GlmlocalError):
    """Download failures: missing/gated repository, no token, network failure, corrupt file."""


class RepoNotFoundError(HubError):
    """The hub has no such repository (or hides a private one from us)."""


class ContextOverflowError(GlmlocalError):
    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int):
        super().__init__(
            f"prompt of {prompt_tokens} tokens plus {max_tokens} to generate exceeds the "
            f"context of {n_ctx} tokens",
            hint="shorten the conversation or raise --ctx",
        )
        self.prompt_tokens, self.max_tokens, self.n_ctx = prompt_tokens, max_tokens, n_ctx


class TemplateError(InputError):
    """A chat template cannot be loaded or rendered (syntax error, hostile or runaway template, bad messages)."""
