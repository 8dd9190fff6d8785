"""The base of the server's middleware: pure ASGI, for HTTP requests only.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: the guards cap the body as it is received
and hand the service the client's own ``receive`` (to notice the client going away).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HTTPMiddleware:
    """Wraps ``app``: :meth:`handle` gets each HTTP request; every other scope (lifespan) goes straight to ``app``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError
