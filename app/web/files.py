"""Serving stored files: only from whitelisted subfolders, with long-lived cache headers.

Names are content addresses (images, thumbnails) or stable per run (crops, heatmaps), so a file
never changes under its name: browsers keep it for a year without asking again. Small files (a
gallery asks for 50 crops at once) are read on the event loop in one go, without the thread
hand-offs of a streamed file response; large ones are streamed as usual.
"""
from __future__ import annotations

import mimetypes
import stat
from email.utils import formatdate

from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope

#: Under runs/ and models/ only pictures are served (crops, heatmaps, translations), never maps,
#: indexes or weights.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
PICTURES_ONLY = ("runs", "models")
CACHE_FOREVER = "public, max-age=31536000, immutable"
SMALL_FILE = 256 * 1024


class ImmutableFiles(StaticFiles):
    def __init__(self, *, directory, allowed: tuple[str, ...]):
        super().__init__(directory=directory, check_dir=False)
        self.allowed = allowed

    async def get_response(self, path: str, scope: Scope):
        # The database and staging area sit in the same folder: never serve them.
        top = path.split("/", 1)[0]
        if top not in self.allowed or (top in PICTURES_ONLY
                                       and not path.lower().endswith(IMAGE_SUFFIXES)):
            raise HTTPException(status_code=404)
        if scope["method"] in ("GET", "HEAD"):
            try:
                full_path, stat_result = self.lookup_path(path)
            except (OSError, ValueError):
                raise HTTPException(status_code=404) from None
            if stat_result is None or not stat.S_ISREG(stat_result.st_mode):
                raise HTTPException(status_code=404)
            if stat_result.st_size <= SMALL_FILE:
                return self._small_file(full_path, stat_result, scope)
        response = await super().get_response(path, scope)
        if response.status_code == 200:
            response.headers["Cache-Control"] = CACHE_FOREVER
        return response

    def _small_file(self, full_path: str, stat_result, scope: Scope) -> Response:
        etag = f'"{stat_result.st_mtime_ns:x}-{stat_result.st_size:x}"'
        headers = {"cache-control": CACHE_FOREVER, "etag": etag,
                   "last-modified": formatdate(stat_result.st_mtime, usegmt=True)}
        for key, value in scope["headers"]:
            if key == b"if-none-match" and value.decode("latin-1") == etag:
                return Response(status_code=304, headers=headers)
        with open(full_path, "rb") as handle:
            content = handle.read()
        media_type = mimetypes.guess_type(full_path)[0] or "application/octet-stream"
        if scope["method"] == "HEAD":
            return Response(status_code=200, headers=dict(headers, **{"content-length": str(len(content))}),
                            media_type=media_type)
        return Response(content, media_type=media_type, headers=headers)
