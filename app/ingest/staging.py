"""Staging folders with an owner, and the sweep that removes what a killed process left behind.

Every folder under <home>/staging/ (an ingest's staged files, staging/<key>; an upload being
received or waiting for its ingest job, staging/uploads/<id>) holds a lock file that its owner
keeps locked while it uses the folder (app/locks.py): the kernel drops the lock when the owner
dies, however it dies. The sweep (`diffmine doctor`, and `diffmine serve` as it starts) removes
only folders whose lock is free, and keeps an upload that a queued or running ingest job still
needs.

An ingest moves its files into images/ and thumbs/ inside its database transaction, just
before the commit, and first lists them in its staging folder (PUBLISHED). If it is killed
before the commit, that list finds the files no row references, and the sweep deletes them.
Deleting files that no row references, and an ingest's move-then-commit, both happen under the
database's write lock, so a file is never deleted between an ingest's check that it is there
and the commit of the rows that reference it.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from app.db import hold_write_lock, session_scope
from app.jobs import ACTIVE
from app.locks import Held, hold, try_hold
from app.models import Image, Job
from app.settings import Settings

#: The owner's lock file, inside the folder it owns.
OWNER = ".owner.lock"
#: An ingest's list of the files it is moving into the data folder, one relative path a line.
PUBLISHED = ".published"
#: A folder without a lock file (left by a version before locks, or caught between its mkdir
#: and its lock) is removed only once it is this old.
LOCKLESS_GRACE_SECONDS = 600
#: The data folder's subfolders where ingests publish files that rows reference.
PUBLISHED_FOLDERS = ("images", "thumbs")
_BATCH = 500


#: Tests only: the ingest stops at this named point (and waits to be killed there).
PAUSE_VARIABLE = "DIFFMINE_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """Where the crash tests stop an ingest: with DIFFMINE_TEST_PAUSE_AT=name in the
    environment, say so on stderr and wait there until killed, or until SIGUSR1 (then go on).
    Nothing otherwise."""
    if os.environ.get(PAUSE_VARIABLE) != name:
        return
    import signal
    import sys
    import threading

    go_on = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, lambda *_: go_on.set()) if in_main else None
    print(f"diffmine: paused at {name}", file=sys.stderr, flush=True)
    try:
        while not go_on.wait(0.05):  # off the main thread (a web request): until killed
            pass
    finally:
        if in_main:
            signal.signal(signal.SIGUSR1, previous)


def claim(folder: Path, purpose: str) -> Held:
    """Own `folder` (created if need be) until the returned lock is released or this process
    dies. Release it only after removing the folder, or after handing it to a job row."""
    return hold(folder / OWNER, {"pid": os.getpid(), "purpose": purpose})


@dataclass
class SweepReport:
    dry_run: bool
    #: staging folders removed (or, with dry_run, that would be)
    staging: list[str] = field(default_factory=list)
    #: files under images/ and thumbs/ that no row references, removed
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    #: staging folders left alone: a live process owns them, or a queued job needs them
    in_use: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"dry_run": self.dry_run, "staging": self.staging, "files": len(self.files),
                "bytes": self.bytes, "in_use": self.in_use, "file_paths": self.files[:100]}


def sweep(settings: Settings, *, dry_run: bool = False, unreferenced: bool = False) -> SweepReport:
    """Remove staging folders whose owner is gone (and the files their ingest published but
    never committed); with `unreferenced`, also every file under images/ and thumbs/ that no
    row references (a walk of the whole data folder: `diffmine doctor`)."""
    report = SweepReport(dry_run=dry_run)
    staging = settings.staging_dir
    if staging.is_dir():
        needed = _needed_by_jobs(settings)
        uploads = staging / "uploads"
        folders = [p for p in staging.iterdir() if p.is_dir() and p != uploads]
        folders += [p for p in uploads.iterdir() if p.is_dir()] if uploads.is_dir() else []
        for folder in folders:
            _sweep_folder(settings, folder, needed, report)
        for folder in (uploads, staging):
            if not dry_run:
                _remove_if_empty(folder)
    if unreferenced:
        _sweep_unreferenced(settings, report)
    return report


def discard_if_abandoned(settings: Settings, folder: Path) -> None:
    """Before reusing a staging folder's name (a job's retry): if a dead attempt left it,
    remove it and what it published without a commit."""
    if folder.is_dir():
        _sweep_folder(settings, folder, set(), SweepReport(dry_run=False))


def _sweep_folder(settings: Settings, folder: Path, needed: set[Path], report: SweepReport) -> None:
    name = folder.relative_to(settings.staging_dir).as_posix()
    lock = folder / OWNER
    held = try_hold(lock)
    if held is None:
        if lock.exists() or _age(folder) < LOCKLESS_GRACE_SECONDS:
            report.in_use.append(name)  # a live owner (or one starting)
            return
    try:
        if folder.resolve() in needed:
            report.in_use.append(name)  # an upload waiting for its ingest job
            return
        report.staging.append(name)
        if not report.dry_run:
            _discard_published(settings, folder / PUBLISHED, report)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if held is not None:
            held.release()


def _needed_by_jobs(settings: Settings) -> set[Path]:
    """Upload folders that queued or running ingest jobs read (their source, manifest, or the
    folder they remove when done)."""
    uploads = (settings.staging_dir / "uploads").resolve()
    with session_scope(settings) as session:
        rows = session.scalars(select(Job.params).where(Job.kind == "ingest", Job.status.in_(ACTIVE)))
        paths = [value for params in rows for key, value in (params or {}).items()
                 if key in ("source", "manifest", "remove_after") and isinstance(value, str)]
    needed = set()
    for value in paths:
        path = Path(value).resolve()
        if path.is_relative_to(uploads) and path != uploads:
            needed.add(uploads / path.relative_to(uploads).parts[0])
    return needed


def _discard_published(settings: Settings, journal: Path, report: SweepReport) -> None:
    """Delete the files a dead ingest moved into the data folder and no row references."""
    try:
        listed = [line for line in journal.read_text().splitlines() if line]
    except OSError:
        return
    _delete_unreferenced(settings, listed, report)


def _delete_unreferenced(settings: Settings, paths: list[str], report: SweepReport) -> None:
    """Delete those of `paths` (relative to the data folder) that no image row references,
    checked and deleted under the database's write lock (see the module's docstring)."""
    home = settings.home_dir
    for start in range(0, len(paths), _BATCH):
        batch = [p for p in paths[start:start + _BATCH] if _is_published_path(p)]
        if not batch:
            continue
        with session_scope(settings) as session:
            if not report.dry_run:
                hold_write_lock(session, Image.__tablename__)
            used = set(session.scalars(select(Image.stored_path).where(Image.stored_path.in_(batch))))
            used |= set(session.scalars(select(Image.thumb_path).where(Image.thumb_path.in_(batch))))
            for relative in batch:
                target = home / relative
                if relative in used or not target.is_file():
                    continue
                report.files.append(relative)
                report.bytes += target.stat().st_size
                if not report.dry_run:
                    target.unlink(missing_ok=True)
                    _remove_if_empty(target.parent)  # the write lock keeps ingests out of it


def _sweep_unreferenced(settings: Settings, report: SweepReport) -> None:
    home = settings.home_dir
    with session_scope(settings) as session:
        used = set(session.scalars(select(Image.stored_path))) | set(session.scalars(select(Image.thumb_path)))
    candidates = [relative for relative in _files_under(home, PUBLISHED_FOLDERS) if relative not in used]
    # Checked again, row by row, under the write lock: an ingest may have committed since.
    _delete_unreferenced(settings, candidates, report)


def _files_under(home: Path, folders: Iterable[str]) -> Iterable[str]:
    for folder in folders:
        for root, _dirs, files in os.walk(home / folder):
            for name in files:
                yield (Path(root) / name).relative_to(home).as_posix()


def _is_published_path(relative: str) -> bool:
    parts = Path(relative).parts
    return len(parts) >= 2 and parts[0] in PUBLISHED_FOLDERS and ".." not in parts


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass

