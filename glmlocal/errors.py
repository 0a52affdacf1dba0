"""Typed errors. Each carries fields; the CLI turns any GlmlocalError into one actionable line."""

from __future__ import annotations


class GlmlocalError(Exception):
    """Base class for every expected failure. `hint` says what to run next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}" + (f" ({self.hint})" if self.hint else "")


class InputError(GlmlocalError):
    """Bad user input: unknown model, wrong quant name, malformed file, wrong architecture."""

    exit_code = 2


class ConversionError(GlmlocalError):
    """The source checkpoint cannot be converted (missing shard, truncated file, unknown tensor...)."""


class DiskSpaceError(GlmlocalError):
    def __init__(self, path: str, needed: int, available: int, what: str = "output"):
        gib = 1024**3
        super().__init__(
            f"not enough disk space for {what} at {path}: need {needed / gib:.2f} GiB, "
            f"{available / gib:.2f} GiB free",
            hint="free some space or choose another directory",
        )
        self.path, self.needed, self.available = path, needed, available


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
