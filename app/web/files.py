"""Serving stored files: only from whitelisted subfolders, with long-lived cache headers."""
from __future__ import annotations

from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Scope

#: Under runs/ only pictures are served (crops, heatmaps, translations), never maps or indexes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class ImmutableFiles(StaticFiles):
    def __init__(self, *, directory, allowed: tuple[str, ...]):
        super().__init__(directory=directory, check_dir=False)
        self.allowed = allowed

    async def get_response(self, path: str, scope: Scope):
        # The database and staging area sit in the same folder: never serve them.
        top = path.split("/", 1)[0]
        if top not in self.allowed or (top == "runs" and not path.lower().endswith(IMAGE_SUFFIXES)):
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        if response.status_code == 200:
            response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return response
