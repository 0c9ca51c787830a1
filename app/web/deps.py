"""Dependency aliases for routes (`settings: SettingsDep`, `session: SessionDep`, `CSRF`), the
templates with their filters, and `render`: a page or its JSON twin."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

import jinja2
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.db import session_scope
from app.settings import REPO_ROOT, Settings
from app.web.security import CSRF_FIELD, CSRF_HEADER, csrf_ok, csrf_token

templates = Jinja2Templates(directory=REPO_ROOT / "templates")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.settings) as session:
        yield session


def _function_scoped(dependency):
    """The session commits when the route returns, before the response goes out: a browser that
    follows a POST's redirect at once must find what the POST wrote."""
    try:
        return Depends(dependency, scope="function")
    except TypeError:  # FastAPI before 0.118 always closed it before the response
        return Depends(dependency)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, _function_scoped(get_session)]


async def require_csrf(request: Request) -> None:
    """State-changing requests carry the page's CSRF token (form field or X-CSRF-Token)."""
    submitted = request.headers.get(CSRF_HEADER)
    if not submitted and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        submitted = (await request.form()).get(CSRF_FIELD)
    if not csrf_ok(request, submitted if isinstance(submitted, str) else None):
        raise HTTPException(403, "This form has expired or was not sent by diffmine's own page: "
                                 "reload the page and try again.")


#: `dependencies=CSRF` on every POST route.
CSRF = [Depends(require_csrf)]


def wants_json(request: Request) -> bool:
    """Every page has a JSON twin: the same URL with .json, or Accept: application/json."""
    return (getattr(request.state, "as_json", False)
            or "application/json" in request.headers.get("accept", ""))


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def render(request: Request, template: str, context: dict, *, status_code: int = 200,
           headers: dict | None = None):
    """The page, or its JSON twin: `context["data"]` is what both show."""
    if wants_json(request):
        return JSONResponse(context["data"], status_code=status_code, headers=headers)
    return templates.TemplateResponse(request, template, context, status_code=status_code,
                                      headers=headers)


def redirect(request: Request, url: str, *, data: dict | None = None) -> Response:
    """After a POST: a 303 to the next page (htmx: HX-Redirect), or for JSON clients the data
    with the page's URL."""
    if wants_json(request):
        return JSONResponse(dict(data or {}, url=url))
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


# --- template filters -----------------------------------------------------------------------
def sig(value, digits: int = 4) -> str:
    """A number to `digits` significant digits: 0.02578 -> '0.02578', 1234.5 -> '1234'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if value == 0:
        return "0"
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}×10^{int(exponent)}"
    return text


def percent(value) -> str:
    """A share in [0, 1] as a whole percentage: 0.873 -> '87%'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{round(100 * value)}%"


def duration(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def thousands(value) -> str:
    if value is None or isinstance(value, jinja2.Undefined):  # e.g. a model config without steps
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return sig(value)
    return f"{int(value):,}"


def file_url(path: str | None) -> str:
    """A stored file under the data directory, served by /files."""
    return "/files/" + quote(path or "")


templates.env.filters.update(sig=sig, percent=percent, duration=duration, thousands=thousands, file_url=file_url)
templates.env.globals.update(csrf_token=csrf_token, csrf_field=CSRF_FIELD)
