"""The FastAPI application. It only reads what the worker wrote and records jobs: it never
imports torch or runs a model."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.settings import REPO_ROOT, Settings
from app.web.files import ImmutableFiles
from app.web.json_twin import JsonTwinMiddleware
from app.web.views import datasets


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="diffmine", version="0.1.0")
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=REPO_ROOT / "static"), name="static")
    # Content-addressed files (images, thumbnails, crops) never change under a name.
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/files", ImmutableFiles(directory=settings.home_dir, allowed=("images", "thumbs")),
              name="files")
    app.include_router(datasets.router)
    app.add_middleware(JsonTwinMiddleware)
    return app
