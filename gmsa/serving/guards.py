"""Request guards: bearer-token auth, a cap on body size, JSON errors for everything."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False, description="the server's API key (--api-key or GMSA_API_KEY)")


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (when the server has a key)."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        reason = "missing" if credentials is None else "wrong"
        raise HTTPException(
            401, f"{reason} API key: send the header 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"}
        )


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than this server's limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a JSON 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLargeError(self.max_bytes)
            await JSONResponse({"detail": error.detail}, 413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: safe even for lone surrogates sent by a client."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def install_error_handlers(app: FastAPI) -> None:
    """422s without echoing the input back; unexpected errors as a JSON 500 (the traceback goes to the log)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return AsciiJSONResponse({"detail": jsonable_encoder(errors)}, 422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); see the server log"}, 500)
