"""`glmlocal serve`: OpenAI- and Anthropic-compatible HTTP front doors on one local model.

app.py (routes, streaming, cancellation) -> openai.py / anthropic.py / responses_request.py + responses.py (pure
translation) -> types.py (neutral request/usage) -> backend.py (Session/engine) on scheduler.py's single
generation thread.
"""

from glmlocal.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
