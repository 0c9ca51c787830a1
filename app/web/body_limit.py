"""A bound on the request body of every route but the upload (which streams its file to disk
under DIFFMINE_MAX_UPLOAD_BYTES, app/web/upload_stream.py).

The other POST routes take small forms, which Starlette parses in memory: up to 1,000 fields of
1 MB each, so one request to the open /login page could hold a gigabyte. Here a body is refused
with a 413 once it passes MAX_FORM_BYTES: at once when its Content-Length says so, else as soon
as that much has arrived (a chunked body)."""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The largest body a form route reads (the run form, a login, a cancel: a few KB).
MAX_FORM_BYTES = 1 * 2**20
#: Routes that read their own bodies under their own limit.
STREAMED_PATHS = ("/upload", "/upload.json")


def _too_large() -> str:
    return (f"The request body is larger than the limit of {MAX_FORM_BYTES // 2**20} MB for a "
            f"form (uploads go to /upload).")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_FORM_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in STREAMED_PATHS:
            await self.app(scope, receive, send)
            return
        length = next((value for key, value in scope["headers"] if key == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            body = b'{"detail":"' + _too_large().encode() + b'"}'
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _too_large())  # a page or JSON, as any error
            return message

        await self.app(scope, limited, send)
