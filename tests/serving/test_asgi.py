"""The middleware base hands HTTP requests to ``handle`` and every other scope straight to the app."""

from __future__ import annotations

import asyncio

from gmsa.serving.asgi import HTTPMiddleware


class Recording(HTTPMiddleware):
    def __init__(self, app):
        super().__init__(app)
        self.handled: list[str] = []

    async def handle(self, scope, receive, send) -> None:
        self.handled.append(scope["type"])


def test_http_goes_to_handle_and_lifespan_to_the_app():
    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["type"])

    middleware = Recording(app)
    for kind in ("http", "lifespan"):
        asyncio.run(middleware({"type": kind}, None, None))
    assert middleware.handled == ["http"] and reached == ["lifespan"]
