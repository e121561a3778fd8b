"""SQLAlchemy tables: Series, Instance, Job, Delivery (see docs/architecture.md).

No patient name, ID or birth date is stored here: only UIDs, technical
attributes and pipeline state. Times are UTC epoch seconds (float).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    """Instances are arriving; not yet judged complete."""
    COMPLETE = "complete"
    """All instances are believed received; waiting for selection."""
    INCOMPLETE = "incomplete"
    """Fewer instances than the header's expected count arrived before the max wait; never
    classified. `reason` says how many; the missing instances reopen it as a new version."""
    QUEUED = "queued"
    """Selected as 3D T1; waiting for a worker."""
    CLASSIFYING = "classifying"
    """A worker holds the job."""
    CLASSIFIED = "classified"
    """Prediction made and SR written; deliveries pending."""
    DELIVERED = "delivered"
    """The SR reached every destination."""
    SKIPPED = "skipped"
    """Not a series the model accepts; `reason` says why."""
    FAILED = "failed"
    """Gave up after the retry budget; `reason` says why."""
    SUPERSEDED = "superseded"
    """Job only: a newer version of the series replaced this one before it was done."""


class DeliveryState(StrEnum):
    PENDING = "pending"
    """Waiting to be sent (or retried)."""
    SENT = "sent"
    """The destination acknowledged the SR."""
    FAILED = "failed"
    """Permanent refusal or retry budget spent."""
    SUPERSEDED = "superseded"
    """Not sent: a newer version of the series replaced this result first."""


class Base(DeclarativeBase):
    pass


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    # Completion evidence: Images in Acquisition (0020,1002), or 1 for a
    # multi-frame object that carries the whole series.
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True, default=SeriesState.RECEIVING)
    reason: Mapped[str | None] = mapped_column(Text)
    # Incremented when a completed series is reopened by a late instance.
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # Retention (storage/retention.py) removed the spool files at this time; the rows stay for history.
    purged_at: Mapped[float | None] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instance"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    """One classification attempt of one version of a series."""

    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("series_instance_uid", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A failed attempt is retried no earlier than this (UTC epoch seconds).
    not_before: Mapped[float | None] = mapped_column(Float)
    probability: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(32))
    model_id: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(16))
    synthetic: Mapped[bool | None] = mapped_column(Boolean)
    # JSON object: stage name -> milliseconds.
    timings: Mapped[str | None] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_path: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # When selection queued this version, and when a worker claimed it (claim latency).
    queued_at: Mapped[float | None] = mapped_column(Float)
    claimed_at: Mapped[float | None] = mapped_column(Float)
    # While `classifying`: who holds the job ("host:pid" of a worker process) and until when; the
    # worker's heartbeat extends the lease, and an expired lease returns the job to the queue.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)


class Delivery(Base):
    """One SR to one destination."""

    __tablename__ = "delivery"
    __table_args__ = (Index("ix_delivery_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)
    # The exporter sending it now ("host:pid"); next_attempt_at is pushed past the send meanwhile,
    # so no other exporter takes it.
    lease_owner: Mapped[str | None] = mapped_column(String(128))


class ResultObject(Base):
    """One object a job produced (the SR, the result image): what `resend` and export send."""

    __tablename__ = "result_object"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("job.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "sr" | "image"
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(300))
    # sha256 of what decided the content (node/identity.py): equal keys, equal UIDs.
    content_key: Mapped[str] = mapped_column(String(64))
    predecessor_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Transmission(Base):
    """One object acknowledged by one destination: the history `show` prints."""

    __tablename__ = "transmission"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(Integer, ForeignKey("delivery.id"), index=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("job.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # the source series
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    result_series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)  # the destination's C-STORE status (or HTTP status)
    sent_at: Mapped[float] = mapped_column(Float)


class AuditEvent(Base):
    """The audit trail (storage/audit.py, `migraine-node audit`): associations, studies received,
    objects sent, replays and resends, and who did them. Identifiers only, never patient data."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_kind_at", "kind", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(32))  # storage/audit.py KINDS
    # Calling AE title (associations), our AE title (objects sent), "user@host" (commands).
    actor: Mapped[str | None] = mapped_column(String(128))
    address: Mapped[str | None] = mapped_column(String(64))  # the peer's IP address (or host:port)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    destination: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)  # JSON object: reasons, counts, UIDs
