"""Relative paths inside an upload: normalised, and never allowed to escape the root."""
from __future__ import annotations

import posixpath

from app.ingest.errors import IngestError


def safe_relpath(name: str) -> str:
    cleaned = name.replace("\\", "/")
    normal = posixpath.normpath(cleaned)
    if (not cleaned or cleaned.startswith("/") or normal.startswith("../") or normal == ".."
            or (len(cleaned) > 1 and cleaned[1] == ":")):
        raise IngestError("path escapes the dataset root (path traversal)", path=name or "''")
    return normal


def is_ignored(relpath: str) -> bool:
    """OS litter that zips and folders commonly carry (macOS resource forks, .DS_Store)."""
    parts = relpath.split("/")
    return any(p.startswith(".") or p == "__MACOSX" or p == "Thumbs.db" for p in parts)
