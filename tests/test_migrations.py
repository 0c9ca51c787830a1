from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db import engine_for, upgrade
from app.models import Base
from app.settings import Settings


def test_upgrade_from_empty_creates_every_table(tmp_path):
    settings = Settings(home=tmp_path / "fresh")
    upgrade(settings)
    tables = set(inspect(engine_for(settings.db_url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_migrations_match_the_models(settings):
    with engine_for(settings.db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models changed without a migration: {diff}"


def test_upgrade_is_idempotent_and_uses_wal(settings):
    upgrade(settings)
    with engine_for(settings.db_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
