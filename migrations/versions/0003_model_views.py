"""models trained before image sizes existed are scored through the centre crop, as they were

Their stored config gets view = "centre-crop" and image_size = resolution, so nothing
reinterprets them: app.params.TrainConfig's default view ("whole") is for new models only.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

MODELS = sa.table("trained_models", sa.column("id", sa.Integer), sa.column("config", sa.JSON))


def upgrade() -> None:
    bind = op.get_bind()
    for model_id, config in bind.execute(sa.select(MODELS.c.id, MODELS.c.config)).all():
        config = dict(config or {})
        if "view" in config:
            continue
        config["view"] = "centre-crop"
        config.setdefault("image_size", config.get("resolution"))
        bind.execute(MODELS.update().where(MODELS.c.id == model_id).values(config=config))


def downgrade() -> None:
    bind = op.get_bind()
    for model_id, config in bind.execute(sa.select(MODELS.c.id, MODELS.c.config)).all():
        config = dict(config or {})
        if config.pop("view", None) == "centre-crop":
            bind.execute(MODELS.update().where(MODELS.c.id == model_id).values(config=config))
