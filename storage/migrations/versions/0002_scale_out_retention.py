"""Scale-out and retention: job leases and claim times, delivery leases, purged series.

Columns only (nullable, no rewrite of existing rows): quick on a large database.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("purged_at", sa.Float()))
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("queued_at", sa.Float()))
        batch.add_column(sa.Column("claimed_at", sa.Float()))
        batch.add_column(sa.Column("lease_owner", sa.String(128)))
        batch.add_column(sa.Column("lease_expires_at", sa.Float()))
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("lease_owner")
    with op.batch_alter_table("job") as batch:
        for column in ("lease_expires_at", "lease_owner", "claimed_at", "queued_at"):
            batch.drop_column(column)
    with op.batch_alter_table("series") as batch:
        batch.drop_column("purged_at")
