"""One handler per job kind: handler(context) -> result dict. Imported lazily, so a worker that
only ingests never loads torch."""
from __future__ import annotations

from importlib import import_module
from typing import Callable

HANDLERS = {
    "ingest": "worker.handlers.ingest:run_ingest",
    "train": "worker.handlers.train:run_train",
    "score": "worker.handlers.score:run_score",
    "mine": "worker.handlers.mine:run_mine",
    "pipeline": "worker.handlers.pipeline:run_pipeline",
    "evaluate": "worker.handlers.evaluate:run_evaluate",
    "translate": "worker.handlers.translate:run_translate",
    "parallel": "worker.handlers.parallel:run_parallel",
}


def handler_for(kind: str) -> Callable:
    if kind not in HANDLERS:
        raise ValueError(f"no handler for job kind {kind!r}")
    module, name = HANDLERS[kind].split(":")
    return getattr(import_module(module), name)
