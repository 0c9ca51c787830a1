"""Engine, sessions and schema upgrades for the diffmine database.

Several processes (CLI commands, server processes, workers) may open one data folder at once,
and a new one may be opened by several of them at the same moment. Creating and upgrading the
database therefore runs under an exclusive lock, a file beside the database (`diffmine.sqlite.lock`),
and every other opening checks the schema version under a shared lock on the same file. Alembic
itself runs one upgrade at a time per process (its context is process-wide state).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import REPO_ROOT, Settings


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # First, so that the statements below wait for a lock rather than fail on one.
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL lets the web read while the worker writes; busy_timeout makes writers queue, not fail.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    return config


def sqlite_file(settings: Settings) -> Path | None:
    """The SQLite database file, or None for another database (or an in-memory one)."""
    url = make_url(settings.db_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def schema_lock_path(settings: Settings) -> Path:
    database = sqlite_file(settings)
    return database.with_name(database.name + ".lock") if database else settings.home_dir / "diffmine.lock"


@dataclass(frozen=True)
class Opened:
    """What opening the database made: the data folder, the database (SQLite file) itself."""
    made_folder: bool = False
    made_database: bool = False


def upgrade(settings: Settings) -> None:
    """Bring the database to the newest schema (creates it from empty)."""
    with open_database(settings):
        pass


@contextmanager
def open_database(settings: Settings, *, undo_on_error: bool = False) -> Iterator[Opened]:
    """The database at the newest schema, for the block.

    The call that creates the database keeps the exclusive lock until its block ends: every
    other process opening the folder waits meanwhile, so nobody else has used the new database
    when the block fails. With `undo_on_error`, such a failure then removes the database, and
    the data folder when this call made that too (a failed first ingest leaves nothing behind).
    A database that was there before is never removed."""
    lock = schema_lock_path(settings)
    if lock in _held_here():  # this thread is creating it: it is new and at the newest schema
        yield Opened()
        return
    made_folder = False
    while True:
        made_folder = _make_folder(settings.home_dir) or made_folder
        if lock.parent != settings.home_dir:  # a database outside the data folder
            lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _locked(lock, fcntl.LOCK_SH)
        if fd is None:
            continue  # a failed creator removed the folder meanwhile: start again
        try:
            current = _revision(settings.db_url) == _head()
        finally:
            os.close(fd)
        if current:
            yield Opened()
            return
        fd = _locked(lock, fcntl.LOCK_EX)
        if fd is not None:
            break
    database = sqlite_file(settings)
    # Decided under the exclusive lock: exactly one process creates the database.
    made_database = database is not None and not database.exists()
    try:
        try:
            if _revision(settings.db_url) != _head():
                from alembic import command

                with _alembic:
                    command.upgrade(alembic_config(settings.db_url), "head")
        except BaseException:
            if made_database:
                _remove_database(settings, database)
            raise
        if not made_database:
            os.close(fd)
            fd = None
            yield Opened()
            return
        _held_here().add(lock)
        try:
            yield Opened(made_folder=made_folder, made_database=True)
        except BaseException:
            if undo_on_error:
                _remove_database(settings, database)
                lock.unlink(missing_ok=True)  # processes waiting on it notice and start again
                if made_folder:
                    shutil.rmtree(settings.home_dir, ignore_errors=True)
            raise
        finally:
            _held_here().discard(lock)
    finally:
        if fd is not None:
            os.close(fd)


_alembic = threading.Lock()
_local = threading.local()


def _held_here() -> set[Path]:
    """Schema locks this thread holds exclusively (it is creating their database)."""
    if not hasattr(_local, "held"):
        _local.held = set()
    return _local.held


def _make_folder(folder: Path) -> bool:
    """Create the folder; True when this call made it (os.mkdir decides that atomically)."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def _locked(path: Path, mode: int) -> int | None:
    """An open descriptor of `path` holding the flock `mode`, or None when the file was removed
    or replaced while this waited for it (a failed creator removed its new database folder)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # its folder was removed: the caller makes it again
        return None
    try:
        fcntl.flock(fd, mode)
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@lru_cache(maxsize=1)
def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _revision(url: str) -> str | None:
    """The schema version the database is at; None when it has none (new or empty)."""
    database = make_url(url)
    if database.get_backend_name() == "sqlite" and database.database not in (None, "", ":memory:"):
        if not Path(database.database).exists():
            return None  # do not create the file outside the exclusive lock
    try:
        with engine_for(url).connect() as connection:
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except (OperationalError, ProgrammingError):
        return None


def _remove_database(settings: Settings, database: Path) -> None:
    engine_for(settings.db_url).dispose()  # pooled connections would keep writing to the unlinked file
    # SQLite's write-ahead log and shared-memory files sit beside the database.
    for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm", "-journal"))):
        path.unlink(missing_ok=True)


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = _session_factory(settings.db_url)()
    # What the rows' own rules need (app/jobs.py reads the pending-jobs limit from it).
    session.info["settings"] = settings
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def hold_write_lock(session: Session, table: str) -> None:
    """Take the database's write lock now, and keep it until the session's transaction ends:
    what the session reads next is the newest data, and no other connection writes in between
    (check-then-insert without a race). SQLite locks the whole database for a write; PostgreSQL
    the table."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        # A write that changes nothing still begins the write transaction.
        session.execute(text(f'UPDATE "{table}" SET rowid = rowid WHERE 0'))
    elif dialect == "postgresql":
        session.execute(text(f'LOCK TABLE "{table}" IN SHARE ROW EXCLUSIVE MODE'))
