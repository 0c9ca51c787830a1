"""Datasets uploaded from the browser are recorded by the name the browser gave their file
("upload:photos.zip"), not by the staged path the ingest read them from."""
from __future__ import annotations

from sqlalchemy import update

from app.db import session_scope
from app.models import Dataset
from app.settings import Settings


def set_dataset_source(settings: Settings, name: str, source: str) -> None:
    with session_scope(settings) as session:
        session.execute(update(Dataset).where(Dataset.name == name).values(source=source))
