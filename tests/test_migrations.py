import json

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


def test_models_from_before_image_sizes_keep_their_centre_crop(tmp_path):
    """Migration 0003: a model row stored before image sizes existed is marked as scored through
    the centre square at its resolution; a new model's whole view is not forced on it."""
    from alembic import command
    from sqlalchemy import text

    from app.db import alembic_config
    from app.params import TrainConfig

    settings = Settings(home=tmp_path / "old")
    settings.home_dir.mkdir(parents=True)
    command.upgrade(alembic_config(settings.db_url), "0002")
    with engine_for(settings.db_url).begin() as conn:
        conn.execute(text("INSERT INTO datasets (id, name, source, in_place, image_count, created_at) "
                          "VALUES (1, 'd', 'x', 0, 0, '2026-01-01')"))
        conn.execute(text("INSERT INTO label_sets (id, dataset_id, name, kind) VALUES (1, 1, 's', 'categorical')"))
        conn.execute(text("INSERT INTO trained_models (id, dataset_id, label_set_id, backend, config, weights_dir, "
                          "metrics, status, created_at) VALUES (1, 1, 1, 'pixel', "
                          "'{\"resolution\": 32, \"steps\": 10, \"batch_size\": 4, \"seed\": 0}', 'w', '{}', "
                          "'ready', '2026-01-01')"))
    upgrade(settings)
    with engine_for(settings.db_url).connect() as conn:
        config = json.loads(conn.execute(text("SELECT config FROM trained_models WHERE id = 1")).scalar())
    assert config["view"] == "centre-crop" and config["image_size"] == 32
    assert TrainConfig.model_validate(config).view == "centre-crop"
    assert TrainConfig.for_backend("pixel").view == "whole"
