"""Who computes a stage's pieces (worker/pieces.py): this worker with its cached model, or Ray
actors when DIFFMINE_RAY_ADDRESS is set. Either way the worker writes every result itself."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from worker.context import JobContext
from worker.models import load_trained
from worker.pieces import Executor


def executor(context: JobContext, *, model_id: int, weights: Path, compute: Callable,
             options: dict, name: str) -> Executor:
    """Ray actors when DIFFMINE_RAY_ADDRESS is set, else this worker with its cached model."""
    if context.settings.ray_address:
        from worker.ray_backend import on_ray  # Ray only where it is used

        return on_ray(context, weights, compute, options, name)
    return compute_here(lambda: load_trained(context, model_id, weights), compute, options)


def compute_here(load_denoiser: Callable, compute: Callable, options: dict) -> Executor:
    """The worker's own executor: `compute(denoiser, task, **options)` piece by piece, the
    denoiser loaded on the first piece that needs it (a finished stage never loads it)."""
    def execute(pending):
        denoiser = None
        for path, task in pending:
            denoiser = denoiser or load_denoiser()
            yield path, task, compute(denoiser, task, **options)
    return execute
