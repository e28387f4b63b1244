"""job events: one index on (job_id, seq), the order events are read in

Revision ID: 0005_event_cursor_index
Revises: 0004
"""
from alembic import op


revision = '0005_event_cursor_index'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Events are read as "job_id = ? AND seq > ? ORDER BY seq LIMIT n": with (job_id, seq) that is one
    # index range scan in PostgreSQL (job_id alone meant reading and sorting all of the job's events).
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index('ix_job_events_job_id_seq', ['job_id', 'seq'], unique=False)
        batch_op.drop_index('ix_job_events_job_id')


def downgrade() -> None:
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index('ix_job_events_job_id', ['job_id'], unique=False)
        batch_op.drop_index('ix_job_events_job_id_seq')
