"""OpenAI error bodies, the frontend's exception types and the handlers that render every failure.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with a fitting status:
400 invalid_request_error, 401 bad API key, 404 unknown model or route, 413 body too large, 429 over the
in-flight limit, 503 Triton unavailable, 500 anything else.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vlm_triton.errors import InvalidRequest

logger = logging.getLogger("openai_frontend")

_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


def error_body(
    message: str, status: int, *, type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    message: str,
    status: int,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, status, type=type, param=param, code=code), status, headers=headers)


class APIError(Exception):
    """A failure with its HTTP status and OpenAI error fields; raised anywhere, rendered once by the handler."""

    status_code: int = 500
    error_type: str | None = None
    code: str | None = None
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def response(self) -> JSONResponse:
        return error_response(
            self.message, self.status_code, type=self.error_type, param=self.param, code=self.code, headers=self.headers
        )


class ModelNotFound(APIError):
    status_code = 404
    code = "model_not_found"


class RequestTooLarge(StarletteHTTPException):
    """Raised while the body is read; an HTTPException so FastAPI's body parsing lets it through unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body exceeds the limit of {limit} bytes; send smaller images or raise --max-body-bytes"
        )


class ClientDisconnected(Exception):
    """The HTTP client went away; the engine request has been cancelled and nothing can be sent."""


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable one-line message and the `param` for pydantic/FastAPI request errors.

    Union fields (content: string or list of parts) yield one error per member; only the deepest location is
    kept, and alternatives at the same location are joined with "or".
    """
    by_loc: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"request body is not valid JSON: {detail}".rstrip(": "), None
        if not loc and kind == "missing":
            return "request body is missing; send a JSON object", None
        if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
            return "request body must be a JSON object sent with 'Content-Type: application/json'", None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        messages = by_loc.setdefault(_format_loc(loc), [])
        if msg not in messages:
            messages.append(msg)
    deepest = [where for where in by_loc if not any(_extends(other, where) for other in by_loc)]
    parts = []
    for where in deepest:
        text = " or ".join(m if i == 0 else m.removeprefix("Input should be ") for i, m in enumerate(by_loc[where]))
        parts.append(f"{where}: {text}" if where else text)
    shown = "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")
    return f"invalid request: {shown}", (deepest[0] or None) if deepest else None


def _extends(longer: str, prefix: str) -> bool:
    return len(longer) > len(prefix) and longer.startswith(prefix) and longer[len(prefix)] in ".[" and prefix != ""


def _format_loc(loc: list[Any]) -> str:
    """('messages', 0, 'content', 'list[tagged-union[..]]', 0, 'text', 'text') -> 'messages[0].content[0].text'."""
    out = ""
    previous: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "none") or part == previous:
            continue  # union member names and discriminator tags, not fields of the user's JSON
        else:
            out += f".{part}" if out else part
        previous = part
    return out


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        if exc.status_code >= 500:
            logger.error("%s: %s", type(exc).__name__, exc.message)
        return exc.response()

    async def on_invalid_request(_: Request, exc: Exception) -> Response:
        return error_response(str(exc), 400)

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        return error_response(message, 400, param=param)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(message, exc.status_code, headers=dict(exc.headers or {}))

    async def on_disconnect(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody is listening; recorded as 499 in the metrics

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500, code="internal_error")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidRequest, on_invalid_request)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)
