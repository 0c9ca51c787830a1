"""One handler per job kind: handler(context) -> result dict. The table is the catalog's
(app/catalog.py); a handler is imported only when its kind runs, so a worker that only
ingests never loads torch."""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from app.catalog import JOB_HANDLERS


def handler_for(kind: str) -> Callable:
    if kind not in JOB_HANDLERS:
        raise ValueError(f"no handler for job kind {kind!r}")
    module, name = JOB_HANDLERS[kind].split(":")
    return getattr(import_module(module), name)
