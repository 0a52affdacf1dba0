"""HTTP errors and their two wire shapes (OpenAI's and Anthropic's).

Routes raise `APIError` (or a typed GlmlocalError, mapped here); the app renders it in the shape of the API
the request was addressed to, so each SDK raises its own typed exception.
"""

from __future__ import annotations

from glmlocal.errors import ContextOverflowError, EngineError, GlmlocalError, InputError

# Anthropic error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client: HTTP status, message and optional OpenAI `param`/`code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        anthropic_message: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.anthropic_message = anthropic_message  # when Anthropic's own wording matters to its clients

    def openai_body(self) -> dict:
        err_type = _OPENAI_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": err_type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        err_type = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": err_type, "message": self.anthropic_message or self.message}}


class QueueFullError(APIError):
    """The request queue is full; `retry_after` seconds is our estimate of when a slot frees up."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(
            429,
            f"server busy: {waiting} requests already queued; retry after {retry_after} s",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


def from_exception(exc: BaseException) -> APIError:
    """Map any exception raised while serving a request to the APIError the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        hint = "Shorten the conversation or restart the server with a larger --ctx."
        asks = f"asks for {exc.max_tokens} more" if exc.max_tokens else "leaves no room for an answer"
        return APIError(
            400,
            f"This model's maximum context length is {exc.n_ctx} tokens; the request has {exc.prompt_tokens} "
            f"prompt tokens and {asks}. {hint}",
            param="messages",
            code="context_length_exceeded",
            # Anthropic's wording: Claude Code recognises it as context overflow (offers /compact).
            anthropic_message=(f"prompt is too long: {exc.prompt_tokens} tokens > {exc.n_ctx - 1} maximum "
                               f"(the context is {exc.n_ctx} tokens). {hint}"),
        )
    if isinstance(exc, InputError):
        return APIError(400, exc.one_line())
    if isinstance(exc, EngineError):
        return APIError(500, f"engine error: {exc.one_line()}")
    if isinstance(exc, GlmlocalError):
        return APIError(500, exc.one_line())
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")
