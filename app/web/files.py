"""Serving stored files: only from whitelisted subfolders, with long-lived cache headers."""
from __future__ import annotations

from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Scope


class ImmutableFiles(StaticFiles):
    def __init__(self, *, directory, allowed: tuple[str, ...]):
        super().__init__(directory=directory, check_dir=False)
        self.allowed = allowed

    async def get_response(self, path: str, scope: Scope):
        # The database and staging area sit in the same folder: never serve them.
        if path.split("/", 1)[0] not in self.allowed:
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        if response.status_code == 200:
            response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return response
