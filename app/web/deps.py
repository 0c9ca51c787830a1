"""Dependency aliases for routes: `settings: SettingsDep`, `session: SessionDep`."""
from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.db import session_scope
from app.settings import REPO_ROOT, Settings

templates = Jinja2Templates(directory=REPO_ROOT / "templates")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_scope(settings) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def wants_json(request: Request) -> bool:
    """Every page has a JSON twin: the same URL with .json, or Accept: application/json."""
    return (getattr(request.state, "as_json", False)
            or "application/json" in request.headers.get("accept", ""))


def render(request: Request, template: str, context: dict):
    """The page, or its JSON twin: `context["data"]` is what both show."""
    if wants_json(request):
        return context["data"]
    return templates.TemplateResponse(request, template, context)
