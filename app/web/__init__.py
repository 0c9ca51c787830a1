"""The FastAPI application. It only reads what the worker wrote and records jobs: it never
imports torch or runs a model."""
from __future__ import annotations

import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import upgrade
from app.jobs import QueueFull
from app.settings import MIN_TOKEN_LENGTH, REPO_ROOT, Settings
from app.web.body_limit import BodyLimitMiddleware
from app.web.deps import templates, wants_json
from app.web.files import ImmutableFiles
from app.web.json_twin import JsonTwinMiddleware
from app.web.page_cache import PageCache
from app.web.security import LoginGuard, SecurityMiddleware
from app.web.views import auth, clusters, datasets, images, jobs, parallel, patch_map, patches, runs, uploads

DESCRIPTION = """Mine what is visually typical of each label of an image dataset.

Every page is also JSON: the same URL with `.json` appended (`/runs/1/labels/3.json`), or
`Accept: application/json`. With an access token set (DIFFMINE_TOKEN), send
`Authorization: Bearer TOKEN`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.token and len(settings.token) < MIN_TOKEN_LENGTH:  # a Settings made by model_copy
        raise ValueError(f"the access token must have at least {MIN_TOKEN_LENGTH} characters")
    # Once, here: never per request (Alembic's upgrade is not thread-safe, and requests run in
    # threads). Each server process does it; the schema lock makes them take turns.
    upgrade(settings)
    app = FastAPI(title="diffmine", version="0.1.0", description=DESCRIPTION,
                  docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    app.state.settings = settings
    app.state.sync_ingest_bytes = uploads.SYNC_INGEST_BYTES
    # Gallery pages of ready runs, label menus, datasets' sample thumbnails: one LRU bounded
    # by bytes (web/page_cache.py), and how many small zips are ingested within their request
    # at once (views/uploads.py).
    app.state.page_cache = PageCache(settings.page_cache_bytes)
    app.state.inline_ingests = threading.BoundedSemaphore(settings.max_inline_ingests)
    app.state.login_guard = LoginGuard(settings)  # login throttle and logged-out sessions
    app.mount("/static", StaticFiles(directory=REPO_ROOT / "static"), name="static")
    # Content-addressed files (images, thumbnails) and a run's crops and heatmaps never change
    # under a name.
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/files", ImmutableFiles(directory=settings.home_dir,
                                       allowed=("images", "thumbs", "runs", "models")),
              name="files")
    for module in (datasets, uploads, jobs, runs, patch_map, clusters, parallel, images, patches, auth):
        app.include_router(module.router)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(IntegrityError, conflict)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_middleware(JsonTwinMiddleware)
    # Host check, token, throttle, CSRF nonce, security headers
    app.add_middleware(SecurityMiddleware, settings=settings, guard=app.state.login_guard)
    app.add_middleware(BodyLimitMiddleware)  # outermost: a form's body is bounded before all
    return app


async def conflict(request: Request, exc: IntegrityError):
    """Two requests racing for one unique value (the services name the common cases, such as a
    dataset's name, themselves): a 409, never a 500."""
    return await http_error(request, StarletteHTTPException(
        409, "This conflicts with something saved meanwhile (a name already in use?): reload and "
             "try again."))


async def http_error(request: Request, exc: StarletteHTTPException):
    """Errors as a page with a way on (or JSON for the JSON twin and API clients)."""
    headers = getattr(exc, "headers", None)
    html = "text/html" in request.headers.get("accept", "") and not wants_json(request)
    if not html or request.url.path.startswith(("/files/", "/static/")):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
    return templates.TemplateResponse(request, "error.html",
                                      {"data": {"detail": exc.detail, "status": exc.status_code}},
                                      status_code=exc.status_code, headers=headers)



async def queue_full(request: Request, exc: QueueFull):
    """Too many jobs queued for a dataset (app/jobs.py): a 429 that says which limit, and how
    to make room. Nothing of the request was kept (its transaction rolled back)."""
    message = str(exc)
    return await http_error(request, StarletteHTTPException(429, message[0].upper() + message[1:] + "."))
