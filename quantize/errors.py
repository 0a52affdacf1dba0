"""The converter's typed errors. quantize stands alone (it imports nothing from glmlocal); glmlocal builds its own
errors on these, so the CLI turns either into the same one actionable line."""

from __future__ import annotations


class ToolError(Exception):
    """Base class for every expected failure. `hint` says what to run next; `one_line()` is what the CLI prints."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}" + (f" ({self.hint})" if self.hint else "")


class InputError(ToolError):
    """Bad user input: unknown model, wrong quant name, malformed file, wrong architecture."""

    exit_code = 2


class ConversionError(ToolError):
    """The source checkpoint cannot be converted (missing shard, truncated file, unknown tensor...)."""


class DiskSpaceError(ToolError):
    def __init__(self, path: str, needed: int, available: int, what: str = "output"):
        gib = 1024**3
        super().__init__(
            f"not enough disk space for {what} at {path}: need {needed / gib:.2f} GiB, "
            f"{available / gib:.2f} GiB free",
            hint="free some space or choose another directory",
        )
        self.path, self.needed, self.available = path, needed, available
