"""datasets registered by URL: source_url, blob_key only for uploads

Revision ID: 0003_dataset_url
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_dataset_url'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_url', sa.Text(), nullable=True))
        batch_op.alter_column('blob_key', existing_type=sa.String(length=500), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM datasets WHERE source_url IS NOT NULL AND id NOT IN (SELECT dataset_id FROM jobs)")
    op.execute("UPDATE datasets SET blob_key = 'datasets/' || id || '/upload' WHERE blob_key IS NULL")
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.alter_column('blob_key', existing_type=sa.String(length=500), nullable=False)
        batch_op.drop_column('source_url')
