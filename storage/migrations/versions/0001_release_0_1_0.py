"""The schema of release 0.1.0, which made its tables with create_all (no alembic_version).

A database without alembic_version but with these tables is taken to be this revision
(storage/schema.py stamps it before upgrading).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("series_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("series_description", sa.String(64)),
        sa.Column("series_number", sa.Integer()),
        sa.Column("calling_ae_title", sa.String(16)),
        sa.Column("expected_instances", sa.Integer()),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.Float(), nullable=False),
        sa.Column("last_received_at", sa.Float(), nullable=False),
        sa.Column("completed_at", sa.Float()),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_series_study_instance_uid", "series", ["study_instance_uid"])
    op.create_index("ix_series_state", "series", ["state"])
    op.create_table(
        "instance",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), sa.ForeignKey("series.series_instance_uid"),
                  nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("number_of_frames", sa.Integer(), nullable=False),
        sa.Column("instance_number", sa.Integer()),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(200), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_instance_series_instance_uid", "instance", ["series_instance_uid"])
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("series_instance_uid", sa.String(64), sa.ForeignKey("series.series_instance_uid"),
                  nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.Float()),
        sa.Column("probability", sa.Float()),
        sa.Column("label", sa.String(32)),
        sa.Column("model_id", sa.String(128)),
        sa.Column("device", sa.String(16)),
        sa.Column("synthetic", sa.Boolean()),
        sa.Column("timings", sa.Text()),
        sa.Column("sr_sop_instance_uid", sa.String(64)),
        sa.Column("sr_path", sa.String(300)),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("series_instance_uid", "version"),
    )
    op.create_index("ix_job_series_instance_uid", "job", ["series_instance_uid"])
    op.create_index("ix_job_state", "job", ["state"])
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("job.id"), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float()),
        sa.Column("last_error", sa.Text()),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_delivery_job_id", "delivery", ["job_id"])
    op.create_index("ix_delivery_state_next", "delivery", ["state", "next_attempt_at"])
    op.create_table(
        "result_object",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("job.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(300), nullable=False),
        sa.Column("content_key", sa.String(64), nullable=False),
        sa.Column("predecessor_sop_instance_uid", sa.String(64)),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("job_id", "kind"),
    )
    op.create_index("ix_result_object_job_id", "result_object", ["job_id"])
    op.create_index("ix_result_object_sop_instance_uid", "result_object", ["sop_instance_uid"])
    op.create_table(
        "transmission",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.Integer(), sa.ForeignKey("delivery.id"), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("job.id"), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("result_series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_transmission_delivery_id", "transmission", ["delivery_id"])
    op.create_index("ix_transmission_job_id", "transmission", ["job_id"])
    op.create_index("ix_transmission_series_instance_uid", "transmission", ["series_instance_uid"])


def downgrade() -> None:
    for table in ("transmission", "result_object", "delivery", "job", "instance", "series"):
        op.drop_table(table)
