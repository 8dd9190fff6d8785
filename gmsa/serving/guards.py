"""Request guards, as pure ASGI middleware that runs before the body is read.

:class:`GuardMiddleware` refuses, in this order and without reading the body: a missing or
wrong API key (401), a declared body over the limit (413), a body that is not JSON on a route
that takes JSON (415). It also caps bodies sent without a ``Content-Length``. The error
handlers answer every error as JSON without echoing the input back, and are the one place where the
service's errors (:mod:`gmsa.serving.errors`) become HTTP statuses.
"""

from __future__ import annotations

import json
import logging
import secrets
from contextvars import ContextVar
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .asgi import HTTPMiddleware
from .errors import BusyError, ServiceError

log = logging.getLogger(__name__)
# the ASGI receive of the request being served: the service watches it for the client going away
CLIENT_RECEIVE: ContextVar[Receive] = ContextVar("gmsa_client_receive")
_bearer = HTTPBearer(auto_error=False, description="the server's API key (--api-key or GMSA_API_KEY)")
PUBLIC_PATHS = frozenset({"/healthz"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
HTTP_STATUS: dict[type[ServiceError], int] = {
    errors.InvalidRequestError: 422,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.TooLargeError: 413,
    errors.BusyError: 429,
    errors.ClientGoneError: 499,  # nginx's "client closed request": only the logs and metrics see it
    errors.DamagedContextError: 500,
    errors.TimedOutError: 504,
}


def http_status(err: ServiceError) -> int:
    """The HTTP status of a service error."""
    return next(status for kind, status in HTTP_STATUS.items() if isinstance(err, kind))


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Declares the bearer scheme in the OpenAPI schema; :class:`GuardMiddleware` has already checked the key."""


def key_problem(headers: dict[bytes, bytes], expected: str) -> str | None:
    """Why the request's ``Authorization`` header does not carry ``Bearer <expected>`` (``None`` if it does)."""
    scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if not scheme:
        return "missing"
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
        return "wrong"
    return None


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than this server's limit of {limit} bytes")


def _is_json(content_type: bytes) -> bool:
    media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class GuardMiddleware(HTTPMiddleware):
    """API key, body size and content type, checked from the headers alone (pure ASGI)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int):
        super().__init__(app)
        self.api_key = api_key
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        refusal = self._refusal(scope, headers, has_body)
        if refusal is not None:
            status, detail, extra = refusal
            # the unread body would be taken for the next request: tell the client this connection ends
            extra |= {"Connection": "close"} if has_body else {}
            await JSONResponse({"detail": detail}, status, extra)(scope, receive, send)
            return
        CLIENT_RECEIVE.set(receive)
        await self.app(scope, self._limited(receive), send)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes], has_body: bool) -> tuple[int, str, dict] | None:
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            problem = key_problem(headers, self.api_key)
            if problem:
                detail = f"{problem} API key: send the header 'Authorization: Bearer <key>'"
                return 401, detail, {"WWW-Authenticate": "Bearer"}
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return 413, BodyTooLargeError(self.max_bytes).detail, {}
        if has_body and scope["method"] in BODY_METHODS and not _is_json(headers.get(b"content-type", b"")):
            return 415, "the body must be JSON: send the header 'Content-Type: application/json'", {}
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        return limited_receive


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: safe even for lone surrogates sent by a client."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def install_error_handlers(app: FastAPI) -> None:
    """Service errors with their status, 422s without echoing the input back (unexpected errors are answered
    by the metrics middleware)."""

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, BusyError) else None
        return JSONResponse({"detail": str(exc)}, http_status(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return AsciiJSONResponse({"detail": jsonable_encoder(errors)}, 422)
