"""Every page has a JSON twin at the same URL plus `.json`.

A tiny ASGI middleware strips the suffix and marks the request, so routes are written once and
decide between template and JSON with `wants_json(request)`.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

PASSTHROUGH = ("/static/", "/files/", "/openapi.json")


class JsonTwinMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and path.endswith(".json")
                and not path.startswith(PASSTHROUGH)):
            stripped = path[: -len(".json")]
            if stripped.endswith("/index"):
                stripped = stripped[: -len("index")]
            scope = dict(scope, path=stripped or "/", raw_path=(stripped or "/").encode())
            scope.setdefault("state", {})["as_json"] = True
        await self.app(scope, receive, send)
