"""The audit trail: associations, studies received, objects sent, replays and resends (storage/audit.py).

A new table only: quick on a large database.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128)),
        sa.Column("address", sa.String(64)),
        sa.Column("study_instance_uid", sa.String(64)),
        sa.Column("series_instance_uid", sa.String(64)),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("destination", sa.String(64)),
        sa.Column("detail", sa.Text()),
    )
    op.create_index("ix_audit_event_at", "audit_event", ["at"])
    op.create_index("ix_audit_event_study_instance_uid", "audit_event", ["study_instance_uid"])
    op.create_index("ix_audit_event_kind_at", "audit_event", ["kind", "at"])


def downgrade() -> None:
    op.drop_table("audit_event")
