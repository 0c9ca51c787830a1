"""image_scores.draws: the draws each (image, label) map was computed with

Adaptive scoring gives rows different numbers of draws; rows scored before this column existed
keep NULL (their run's preset says how many).

Revision ID: 0005_adaptive
Revises: 0004_settled
"""
import sqlalchemy as sa
from alembic import op

revision = '0005_adaptive'
down_revision = '0004_settled'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("image_scores") as batch:
        batch.add_column(sa.Column("draws", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image_scores") as batch:
        batch.drop_column("draws")
