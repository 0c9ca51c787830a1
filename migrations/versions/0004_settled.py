"""how settled a result is: each patch's standard error and chance to stay in its label's top K,
each cluster's stability and ranking typicality, each run's top-K cuts (all nullable: runs mined
before have none, and show none)

Revision ID: 0004_settled
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_settled'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('mining_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('top_k_cuts', sa.JSON(), nullable=True))
    with op.batch_alter_table('patches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('score_stderr', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('stay', sa.Float(), nullable=True))
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ranking_typicality', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('stability', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.drop_column('stability')
        batch_op.drop_column('ranking_typicality')
    with op.batch_alter_table('patches', schema=None) as batch_op:
        batch_op.drop_column('stay')
        batch_op.drop_column('score_stderr')
    with op.batch_alter_table('mining_runs', schema=None) as batch_op:
        batch_op.drop_column('top_k_cuts')
