"""Engine, sessions and schema upgrades for the diffmine database."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import REPO_ROOT, Settings


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the web read while the worker writes; busy_timeout makes writers queue, not fail.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
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


def upgrade(settings: Settings) -> None:
    """Bring the database to the newest schema (creates it from empty)."""
    from alembic import command

    settings.home_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.db_url), "head")


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
