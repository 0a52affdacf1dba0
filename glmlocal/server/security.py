"""Who may talk to the server: bind policy, API-key check, request-size limit (pure ASGI middleware)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from glmlocal.errors import InputError
from glmlocal.server.errors import APIError

Shape = Callable[[str], bool]  # path -> True when the error must be in Anthropic's shape


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the model to the network without a key unless the user said --insecure."""
    if is_loopback(host) or api_key or insecure:
        return
    raise InputError(
        f"refusing to listen on {host} without an API key: anyone who can reach it could use the model",
        hint="pass --api-key KEY (or set GLMLOCAL_API_KEY), or --insecure if the network is trusted",
    )


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


async def send_error(send, path: str, err: APIError) -> None:
    """Write an APIError as a complete HTTP response from ASGI middleware."""
    body = json.dumps(err.anthropic_body() if is_anthropic_path(path) else err.openai_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key from `x-api-key` (Anthropic SDK) or `Authorization: Bearer` (OpenAI SDK, Claude Code's AUTH_TOKEN)."""
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].strip()
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return None


# Routes anyone may read without the key: liveness and the API description. Everything else needs it.
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class AuthMiddleware:
    """Require the API key on every route but OPEN_PATHS (constant-time comparison)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = presented_key(headers)
        # Both x-api-key and Bearer may arrive (Claude Code with both env vars set): either may match.
        bearer = presented_key({b"authorization": headers.get(b"authorization", b"")})
        if any(k is not None and hmac.compare_digest(k, self.key) for k in (key, bearer)):
            return await self.app(scope, receive, send)
        message = "invalid API key" if key is not None else "missing API key (x-api-key or Authorization: Bearer)"
        await send_error(send, scope["path"], APIError(401, message, code="invalid_api_key"))


class BodyLimitMiddleware:
    """Answer 413 for bodies over `limit` bytes, by Content-Length or while a chunked body streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = APIError(413, f"request body larger than {self.limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(send, scope["path"], too_big)
        state = {"seen": 0, "answered": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request" and not state["answered"]:
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    # Answer now and tell the app the client left, so it stops reading; drop its reply.
                    state["answered"] = True
                    await send_error(send, scope["path"], too_big)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not state["answered"]:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise


# Origins of local apps that embed a web view (VS Code webviews, Electron and Tauri apps), as Ollama allows them.
APP_ORIGIN_SCHEMES = frozenset({"app", "file", "tauri", "vscode-webview", "vscode-file"})


def _loopback_name(host: str) -> bool:
    """A loopback host name or IP literal, without any DNS lookup (a rebinding attacker controls DNS)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str, allowed: Iterable[str]) -> bool:
    """Browser origins that may use the model: the --cors ones, local pages and local apps."""
    allowed = set(allowed)
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme in APP_ORIGIN_SCHEMES:
        return True
    return parts.scheme in ("http", "https") and _loopback_name(parts.hostname or "")


class OriginGuard:
    """Keeps web pages from driving the local model (CSRF, DNS rebinding): a request whose `Origin` is not
    allowed gets 403, and - when the server listens on loopback only - so does one whose `Host` is not a
    loopback name (a rebound DNS name reaches 127.0.0.1 with the attacker's Host and, for GETs, no Origin).
    Clients that are not browsers send no Origin and a loopback Host, so they are unaffected."""

    def __init__(self, app, cors_origins: Iterable[str] = (), loopback_only: bool = False,
                 extra_hosts: Iterable[str] = ()):
        self.app, self.cors = app, tuple(cors_origins)
        self.loopback_only, self.extra_hosts = loopback_only, {h.strip("[]").lower() for h in extra_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not origin_allowed(origin, self.cors):
            message = f"requests from web origin {origin!r} are refused; allow it with --cors {origin}"
            return await send_error(send, scope["path"], APIError(403, message, code="origin_not_allowed"))
        host = urlsplit("//" + headers.get(b"host", b"").decode("latin-1")).hostname or ""
        if self.loopback_only and host and not (_loopback_name(host) or host in self.extra_hosts):
            message = (f"Host {host!r} is not this machine's loopback name (DNS rebinding protection); "
                       "connect to 127.0.0.1 or localhost, or start the server with --insecure")
            return await send_error(send, scope["path"], APIError(403, message, code="host_not_allowed"))
        return await self.app(scope, receive, send)
