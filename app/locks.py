"""Which process owns a file or folder: an advisory lock (flock) held on a lock file for as long
as the owner uses it. The kernel releases it when the owner exits, however it exits (SIGKILL
included), so "the lock is free" means "the owner is gone", with no pid to reuse and no clock.

Used for staging folders (app/ingest/staging.py) and for the registry of live workers
(app/jobs.py). Where flock is missing (Windows), every owner counts as alive: nothing is swept.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class Held:
    """An exclusive lock on `path`, held by this process until `release()` (or its death)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self, *, remove: bool = False) -> None:
        """Let go; with `remove`, delete the lock file first (while still holding it)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *_exc) -> None:
        self.release(remove=True)


def hold(path: Path, info: dict | None = None) -> Held:
    """Create `path` (and its folder) and hold an exclusive lock on it; `info` is written into it
    as JSON (who holds it). Blocks while another process holds it.

    A sweeper may delete a lock file it found free just before we lock it: after locking, the
    path must still name the file we locked, else we start again."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            continue  # a sweep removed an empty parent folder meanwhile
        if fcntl is None:
            break
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if info is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    return Held(path, fd)


def try_hold(path: Path) -> Held | None:
    """The lock on an existing `path` if nobody holds it (its owner is gone), else None. None
    too where the file is missing or locks are not available."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return Held(path, fd)


def is_held(path: Path) -> bool:
    """Whether a live process holds the lock on `path` (True where locks are not available)."""
    if fcntl is None:
        return True
    free = try_hold(path)
    if free is None:
        return path.exists()
    free.release()
    return False


def read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
