"""worker catalogs: architectures and cached pretrained weights, as workers report them

Revision ID: 0004
Revises: 0003_dataset_url
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003_dataset_url'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'worker_catalogs',
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('catalog', sa.JSON(), nullable=False),
        sa.Column('reported_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('hostname'),
    )


def downgrade() -> None:
    op.drop_table('worker_catalogs')
