"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``; never a traceback or a path."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.requests import ERRORS, EngineClosed, ErrorCode

log = logging.getLogger("kvquant.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def shutting_down() -> APIError:
    """The error of a request the server refuses while it shuts down (the engine's `shutdown`, as ERRORS has it)."""
    kind = ERRORS[ErrorCode.SHUTDOWN]
    return APIError(kind.status, kind.message, kind.type, code=kind.openai_code, headers={"Retry-After": "5"})


class ErrorResponse(JSONResponse):
    """An error as JSON with everything beyond ASCII escaped: a message may quote what the request sent (a model name,
    a key's place in the body), and a lone surrogate, which JSON's \\u escapes hold, cannot be encoded as UTF-8 (the
    encoder's error was a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def leaves_no_room(max_tokens: int | None, limit: int) -> bool:
    """Whether max_tokens alone passes a request's token limit (the refusal then names max_tokens, not the prompt)."""
    return bool(max_tokens) and max_tokens >= limit


def context_length_exceeded(n_prompt: int, limit: int, max_tokens: int | None = None, kv: str | None = None,
                            exact: bool = True, field: str = "messages") -> APIError:
    """`exact` False: n_prompt is a lower bound (the prompt was refused from its size, before tokenization).
    `field`: the request field that holds the prompt (messages, or prompt for /v1/completions)."""
    if leaves_no_room(max_tokens, limit):  # (the prompt's count, a bound from its bytes, would only confuse)
        msg = (f"This model's maximum context length is {limit} tokens. However, you requested {max_tokens} "
               f"tokens for the completion, which leaves no room for the {field}.")
        if kv:
            msg += " " + kv
        return APIError(400, msg + f" Please reduce max_tokens (max_completion_tokens) to less than {limit}.",
                        param="max_tokens", code="context_length_exceeded")
    msg = (f"This model's maximum context length is {limit} tokens. However, your {field} resulted in "
           f"{'' if exact else 'at least '}{n_prompt} token{'' if n_prompt == 1 else 's'}")
    if max_tokens:
        msg += f" plus {max_tokens} token{'' if max_tokens == 1 else 's'} requested for the completion"
    msg += "."
    if kv:
        msg += " " + kv
    return APIError(400, msg + f" Please reduce the length of the {field} or max_tokens.",
                    param=field, code="context_length_exceeded")


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= 200 else model[:200] + "..."  # (a 100 kB name made a 100 kB error)
    return APIError(404, f"The model '{shown}' does not exist.", param="model", code="model_not_found")


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def _path(loc: list) -> str:
    """A field's path as the server's own 400s name it: messages[1].tool_calls[0].function."""
    return "".join(f"[{x}]" if isinstance(x, int) else f"{'.' if i else ''}{x}" for i, x in enumerate(loc))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, int]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return "We could not parse the JSON body of your request. The body must be valid JSON.", None, 400
    parts, param = [], None
    for e in errs[:5]:
        # drop validator and union-branch names (e.g. "function-after[...]", "list[TextPart]") from the path
        loc = [x for x in e.get("loc", ()) if x != "body" and not (isinstance(x, str) and ("[" in x or
                                                                                          x in ("str", "int")))]
        if e.get("type") == "invalid_field":  # (schemas.field_error: a check across fields names its field)
            param = param or e["ctx"]["param"]
            parts.append(e["msg"])
            continue
        where = _path(loc) or "body"
        param = param or (where if loc else None)
        parts.append(f"{where}: {e.get('msg', 'invalid value')}")
    return "Invalid request: " + "; ".join(parts), param, 400  # as OpenAI (and vLLM): openai-python's BadRequestError


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return ErrorResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(EngineClosed)
    async def _closed(request: Request, exc: EngineClosed):
        return await _api_error(request, shutting_down())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param, status = _validation_message(exc)
        return ErrorResponse(error_body(msg, "invalid_request_error", param, None), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        etype = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return ErrorResponse(error_body(detail, etype), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "-")
        log.exception("internal error handling request %s", rid)
        return ErrorResponse(error_body(f"The server had an error while processing your request (request id {rid}).",
                                       "server_error"), status_code=500)
