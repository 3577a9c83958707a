"""Database rows (SQLAlchemy 2 typed models). The schema is created only by the Alembic
migrations in ``migrations/``; keep both in step (``tests/service`` checks they agree)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship
from sqlalchemy.sql import select, update
from sqlalchemy.types import TypeDecorator

from service_core import public_ids


def utcnow() -> datetime:
    return datetime.now(UTC)


def public_id_column(prefix: str) -> Mapped[str]:
    """The id the API shows for a row (``service_core.public_ids``), set at insert."""
    return mapped_column(
        String(public_ids.COLUMN_LENGTH),
        unique=True,
        index=True,
        default=public_ids.generator(prefix),
    )


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# Job states. ``ACTIVE`` ones still hold their stage's position in the lineage.
JOB_VALIDATING = "validating"
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_CANCELLING = "cancelling"
JOB_SUCCEEDED = "succeeded"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_STATUSES = (
    JOB_VALIDATING,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_CANCELLING,
    JOB_SUCCEEDED,
    JOB_FAILED,
    JOB_CANCELLED,
)
JOB_TERMINAL = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
JOB_PHASES = ("importance", "training", "evaluating")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = public_id_column(public_ids.API_KEY)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Corpus(Base):
    __tablename__ = "corpora"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = public_id_column(public_ids.CORPUS)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    storage_path: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(16))
    compressed: Mapped[bool] = mapped_column(Boolean, default=False)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    documents: Mapped[int] = mapped_column(BigInteger)
    characters: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="ready")
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # `pretraining` (text to train on) or `end_task` (labelled JSONL to probe the stages on)
    purpose: Mapped[str] = mapped_column(String(16), default="pretraining")
    # DELETE /v1/corpora/{id}: the file is removed, the row stays (finished stages keep
    # naming it) and the id answers 404
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Lineage(Base):
    __tablename__ = "lineages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = public_id_column(public_ids.LINEAGE)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(500))
    architecture: Mapped[str] = mapped_column(String(100))
    objective: Mapped[str] = mapped_column(String(8))
    strategy: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    general_corpus_id: Mapped[int | None] = mapped_column(ForeignKey("corpora.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # POST /v1/lineages/{id}/fork: the parent and the position of its last copied stage
    forked_from_id: Mapped[int | None] = mapped_column(ForeignKey("lineages.id"), default=None)
    forked_from_position: Mapped[int | None] = mapped_column(Integer, default=None)
    # DELETE /v1/lineages/{id}: the row stays (ids are never reused, so no stale folder can
    # be mistaken for a new lineage's) and answers 404; files_removed_at is set once its
    # folder is gone (at once, or when the worker of a force-cancelled stage has stopped)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    files_removed_at: Mapped[datetime | None] = mapped_column(default=None)

    stages: Mapped[list[Stage]] = relationship(
        back_populates="lineage", order_by="Stage.position", lazy="selectin"
    )


class Stage(Base):
    """One domain of a lineage, at a fixed position; trained by exactly one job."""

    __tablename__ = "stages"
    __table_args__ = (
        UniqueConstraint("lineage_id", "position", name="uq_stages_lineage_position"),
        # NULL once the stage failed or was cancelled, so that the name can be used again.
        UniqueConstraint("lineage_id", "active_name", name="uq_stages_lineage_active_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    active_name: Mapped[str | None] = mapped_column(String(64), default=None)
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id"))
    eval_corpus_id: Mapped[int | None] = mapped_column(ForeignKey("corpora.id"), default=None)
    # a labelled set (purpose `end_task`) that every later stage is probed on
    end_task_corpus_id: Mapped[int | None] = mapped_column(ForeignKey("corpora.id"), default=None)
    engine_position: Mapped[int | None] = mapped_column(Integer, default=None)
    steps: Mapped[int | None] = mapped_column(Integer, default=None)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # the checkpoint's parameter count and what the strategy grew (ELLE, CPT), once trained
    parameters: Mapped[int | None] = mapped_column(BigInteger, default=None)
    growth: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    lineage: Mapped[Lineage] = relationship(back_populates="stages")
    job: Mapped[Job] = relationship(back_populates="stage", lazy="selectin", uselist=False)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = public_id_column(public_ids.JOB)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id"), unique=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"), index=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JOB_VALIDATING)
    phase: Mapped[str | None] = mapped_column(String(16), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the ``seq`` of the job's newest event (events are numbered 1, 2, ... per job, so an
    # event id reveals nothing of other jobs); bumped by ``lifecycle.add_event``
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claim_token: Mapped[str | None] = mapped_column(String(64), default=None)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    stage: Mapped[Stage] = relationship(back_populates="job")


def next_event_seq(context: Any) -> int:
    """The number of a new event within its job (1, 2, ...), the default of
    ``JobEvent.seq``: bumped on the job row, whose lock orders concurrent writers (API and
    worker) until they commit. ``updated_at`` is kept: an event alone does not change the
    job's representation."""
    jobs = Job.__table__
    job_id = context.get_current_parameters()["job_id"]
    return context.connection.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .values(last_event_seq=jobs.c.last_event_seq + 1, updated_at=jobs.c.updated_at)
        .returning(jobs.c.last_event_seq)
    ).scalar_one()


class JobEvent(Base):
    """One entry of a job's log. Users see ``seq`` (its number within the job) as the
    event's id, cursor and server-sent-event id, never the global row id."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer, default=next_event_seq)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    final: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImportanceSnapshot(Base):
    __tablename__ = "importance_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # general | domain | accumulated
    path: Mapped[str] = mapped_column(String(1024))
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalScore(Base):
    """One cell of a lineage's evaluation matrix: the model after ``stage`` (NULL: the base
    model) evaluated on ``domain`` (NULL: the general corpus)."""

    __tablename__ = "eval_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"), index=True)
    stage_id: Mapped[int | None] = mapped_column(ForeignKey("stages.id"), default=None)
    domain: Mapped[str | None] = mapped_column(String(64), default=None)
    metric: Mapped[str] = mapped_column(String(32), default="loss")
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EndTaskScore(Base):
    """One cell of a lineage's end-task matrices: the model after ``stage`` (NULL: the base
    model) probed on the labelled task of ``task_stage`` (the stage the set is attached to)."""

    __tablename__ = "end_task_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"), index=True)
    stage_id: Mapped[int | None] = mapped_column(ForeignKey("stages.id"), default=None)
    task_stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id"))
    mode: Mapped[str] = mapped_column(String(16), default="linear")
    accuracy: Mapped[float] = mapped_column(Float)
    macro_f1: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("owner", "key", name="uq_idempotency_owner_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Webhook deliveries: `pending` (due at next_attempt_at, also while one is in flight: its
# claim moves next_attempt_at past the request's timeout), then `delivered` (a 2xx),
# `failed` (no 2xx after the last attempt) or `cancelled` (its endpoint was deleted).
DELIVERY_PENDING = "pending"
DELIVERY_DELIVERED = "delivered"
DELIVERY_FAILED = "failed"
DELIVERY_CANCELLED = "cancelled"
DELIVERY_STATUSES = (DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_FAILED, DELIVERY_CANCELLED)


class WebhookEndpoint(Base):
    """An owner's URL told of job status changes (``events``: the event types it takes)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = public_id_column(public_ids.WEBHOOK)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]] = mapped_column(default=list)
    description: Mapped[str] = mapped_column(String(500), default="")
    # the signing key itself (HMAC needs it, a hash would not do), ``whsec_`` + base64
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    secret_rotated_at: Mapped[datetime | None] = mapped_column(default=None)
    # DELETE: the row stays (its id is never reused) and answers 404
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row written in the transaction that changed
    the job's status, then the log of its delivery."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    # the ``webhook-id`` header and the body's ``id``: the same for every attempt
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    # the event as sent (``{id, type, created_at, data: {job}}``), fixed when it happened
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(String(64), default=None)
    last_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


# -- the public ids of referenced rows, loaded in the same SELECT as the row ---------------
# (presenters show these, never the integer foreign keys; a correlated subquery costs no
# extra statement on the most polled reads)


def _public_id_of(model: type[Base], key: Any) -> Any:
    other = model.__table__.alias()  # an alias: a lineage may name another lineage
    return column_property(
        select(other.c.public_id).where(other.c.id == key).correlate_except(other).scalar_subquery()
    )


Lineage.general_corpus_public_id = _public_id_of(Corpus, Lineage.general_corpus_id)
Lineage.forked_from_public_id = _public_id_of(Lineage, Lineage.forked_from_id)
Stage.corpus_public_id = _public_id_of(Corpus, Stage.corpus_id)
Stage.eval_corpus_public_id = _public_id_of(Corpus, Stage.eval_corpus_id)
Stage.end_task_corpus_public_id = _public_id_of(Corpus, Stage.end_task_corpus_id)
Stage.lineage_public_id = _public_id_of(Lineage, Stage.lineage_id)
Job.lineage_public_id = _public_id_of(Lineage, Job.lineage_id)
JobEvent.job_public_id = _public_id_of(Job, JobEvent.job_id)
WebhookDelivery.job_public_id = _public_id_of(Job, WebhookDelivery.job_id)
