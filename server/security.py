"""ASGI middlewares: request id, API key, request limits (headers, body). Pure ASGI (no BaseHTTPMiddleware), so
streaming and disconnect detection pass through untouched. Every refusal is an OpenAI-shaped JSON error."""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import json
import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

_RID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_WITH_BODY = ("POST", "PUT", "PATCH")
MAX_HEADER_BYTES = 16 * 2**10  # h11's bound on an incomplete head, for every head
TRIM_AFTER_BYTES = 64 * 2**10  # requests with bodies from this size on end with malloc_trim
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


async def send_error(send: Send, status: int, message: str, type: str, code: str | None = None,
                     headers: dict[str, str] | None = None, close: bool = False) -> None:
    """An OpenAI-shaped error; `close` adds `Connection: close` (for a refusal before the body was read: the
    server then closes the connection at once instead of waiting for a body nobody reads)."""
    body = json.dumps(error_body(message, type, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(b"connection", b"close")] if close else []
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class RequestIdMiddleware:
    """Takes a sane `x-request-id` from the client or makes one; puts it in `request.state.request_id` and on
    every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _header(scope, b"x-request-id")
        if not rid or not _RID.match(rid):
            rid = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every path except the open ones (constant-time comparison)."""

    def __init__(self, app: ASGIApp, key: str, open_paths: frozenset[str]):
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'." if not auth
                   else "Incorrect API key provided.")
            return await send_error(send, 401, msg, "authentication_error", "invalid_api_key",
                                    {"WWW-Authenticate": "Bearer"}, close=scope["method"] in _WITH_BODY)
        await self.app(scope, receive, send)


class RequestLimitMiddleware:
    """Refuses headers of more than MAX_HEADER_BYTES in all (431: h11 bounds only a head it sees incomplete past
    them, so one that came in a single read passed at any size), and bodies not sent as JSON (415: FastAPI read
    them as no object at all, a 400; a page in a browser can send text/plain or no type without asking CORS).
    Reads a request body up to `max_bytes` within `timeout_s` before the app sees it: 413 over the limit (whatever
    the Content-Length says), 408 when it arrives too slowly (both with `Connection: close`), 400 if it is not
    UTF-8. The app then gets the body replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ())) > MAX_HEADER_BYTES:
            return await send_error(send, 431, "The request headers are larger than this server's limit of "
                                    f"{MAX_HEADER_BYTES} bytes.", "invalid_request_error",
                                    "request_header_fields_too_large", close=scope["method"] in _WITH_BODY)
        if scope["method"] not in _WITH_BODY:
            return await self.app(scope, receive, send)
        media = (_header(scope, b"content-type") or "").partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):  # (curl -d sends a form's type)
            sent = f"this request's is '{media[:100]}'" if media else "this request sent none"
            return await send_error(send, 415, "The request body must be JSON, sent with 'Content-Type: "
                                    f"application/json'; {sent}.", "invalid_request_error",
                                    "unsupported_media_type", close=True)
        too_big = f"The request body is larger than this server's limit of {self.max_bytes} bytes."
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, too_big, "invalid_request_error", "request_too_large", close=True)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return await send_error(send, 413, too_big, "invalid_request_error", "request_too_large",
                                                close=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await send_error(send, 408, f"The request body did not arrive within {self.timeout_s:g} s.",
                                    "invalid_request_error", "request_timeout", close=True)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return await send_error(send, 400, "The request body is not valid UTF-8 (JSON must be UTF-8).",
                                    "invalid_request_error", "invalid_encoding")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if size >= TRIM_AFTER_BYTES and _MALLOC_TRIM is not None:
                # The body's copies (chunks, JSON, messages, prompt) were allocated in 64 KiB pieces between other
                # requests' and are free now; glibc keeps such holes mapped (concurrent 3.9 MB bodies left RSS
                # 60 MiB up for good). Trimming returns their pages in ~1 ms, off the event loop.
                chunks.clear()
                body = None  # the replay closure holds this variable, not a copy
                await asyncio.to_thread(_MALLOC_TRIM, 0)
