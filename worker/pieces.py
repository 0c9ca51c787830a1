"""The loop every resumable compute stage shares (scoring shards, DIFT feature parts).

A piece is `(file, task)`: done when its file exists. Pieces not done are computed by an
executor, here in the worker (`compute_here`) or on Ray actors (worker/ray_backend.py), and each
result is written by the stage's own `write` as it arrives, so both ways write alike, resume
alike and report progress alike. Pieces are read lazily: the local path never holds more than
the piece it is computing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

from worker.context import JobContext

Pieces = Iterable[tuple[Path, object]]
#: executor(pending pieces) -> (file, task, result) for each, in any order
Executor = Callable[[Iterator[tuple[Path, object]]], Iterator[tuple[Path, object, object]]]


def run_pieces(context: JobContext, pieces: Pieces, execute: Executor, write: Callable, *,
               stage: str, message: str, size: Callable[[object], int], total: int) -> int:
    """Compute the pieces whose file is missing and `write(file, task, result)` each; returns the
    work done in all. Progress counts `size(task)` per piece (done before or now), reported
    with `message.format(done=, total=)`; a cancel is checked between pieces."""
    done = 0

    def pending() -> Iterator[tuple[Path, object]]:
        nonlocal done
        for path, task in pieces:
            if path.exists():
                done += size(task)
            else:
                yield path, task

    for path, task, result in execute(pending()):
        write(path, task, result)
        done += size(task)
        context.progress(done, total, message.format(done=done, total=total), stage=stage)
        context.check()
    context.progress(done, total, message.format(done=done, total=total), stage=stage, force=True)
    return done


def executor(context: JobContext, *, model_id: int, weights: Path, compute: Callable,
             options: dict, name: str) -> Executor:
    """Ray actors when DIFFMINE_RAY_ADDRESS is set, else this worker with its cached model."""
    if context.settings.ray_address:
        from worker.ray_backend import on_ray

        return on_ray(context, weights, compute, options, name)
    from worker.handlers.models import load_trained

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
