"""The loop every resumable compute stage shares (scoring shards, DIFT feature parts).

A piece is `(file, task)`: done when its file exists. Pieces not done are computed by an
executor (worker/executors.py), here in the worker or on Ray actors (worker/ray_backend.py), and each
result is written by the stage's own `write` as it arrives, so both ways write alike, resume
alike and report progress alike. Pieces are read lazily: the local path never holds more than
the piece it is computing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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

    # The stage is shown from its start, not from its first finished piece (a shard can take minutes).
    context.progress(0, total, message.format(done=0, total=total), stage=stage, force=True)
    for path, task, result in execute(pending()):
        write(path, task, result)
        done += size(task)
        context.progress(done, total, message.format(done=done, total=total), stage=stage)
        context.check()
    context.progress(done, total, message.format(done=done, total=total), stage=stage, force=True)
    return done
