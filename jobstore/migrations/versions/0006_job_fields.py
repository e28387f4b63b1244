"""jobs: the client's metadata, a runtime limit (max_runtime_s, deadline_at) and the worker's estimated finish

Revision ID: 0006_job_fields
Revises: 0005_event_cursor_index
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_job_fields'
down_revision = '0005_event_cursor_index'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # All nullable: jobs created before this revision have no metadata and no runtime limit.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('metadata', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('max_runtime_s', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('estimated_finish_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('estimated_finish_at')
        batch_op.drop_column('deadline_at')
        batch_op.drop_column('max_runtime_s')
        batch_op.drop_column('metadata')
