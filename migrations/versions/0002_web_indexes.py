"""indexes the web app reads by: patches by feature row, cluster members by patch

Revision ID: 0002
Revises: 0001
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('patches', schema=None) as batch_op:
        batch_op.create_index('ix_patches_run_feature', ['run_id', 'feature_row'], unique=False)
    with op.batch_alter_table('cluster_members', schema=None) as batch_op:
        batch_op.create_index('ix_cluster_members_patch', ['patch_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('cluster_members', schema=None) as batch_op:
        batch_op.drop_index('ix_cluster_members_patch')
    with op.batch_alter_table('patches', schema=None) as batch_op:
        batch_op.drop_index('ix_patches_run_feature')
