"""Job state transitions shared by the API and the worker (plain SQL, no Celery, no HTTP).

Rules:
- the stages of one lineage run strictly in order: a job may run only when every earlier
  stage of its lineage has finished (succeeded, failed or cancelled);
- when a stage fails or is cancelled, the stages queued behind it at that moment are
  cancelled too (``previous_stage_not_completed``): a lineage never skips a domain silently;
- a failed or cancelled stage frees its domain name, so the domain can be submitted again.

Every status change calls :func:`status_changed` in its transaction: the owner's webhook
endpoints get the event through the outbox (service_core.webhook_events).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service_core.models import (
    JOB_CANCELLED,
    JOB_CANCELLING,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_TERMINAL,
    JOB_VALIDATING,
    Job,
    JobEvent,
    Stage,
    utcnow,
)
from service_core.webhook_events import record_job_status


def add_event(
    session: Session,
    job_id: int,
    type_: str,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> None:
    """Append an event to the job's log (numbered at insert: ``models.JobEvent.seq``)."""
    session.add(JobEvent(job_id=job_id, type=type_, message=message, level=level, data=data or {}))


def status_changed(session: Session, job: Job) -> None:
    """Announce ``job``'s new status (already set on it) to its owner's webhooks, in the
    transaction that changed it."""
    record_job_status(session, job)


def is_runnable(session: Session, job: Job) -> bool:
    """True when no earlier stage of the job's lineage is still unfinished."""
    position = session.scalar(select(Stage.position).where(Stage.id == job.stage_id))
    blocking = session.scalar(
        select(Job.id)
        .join(Stage, Stage.id == Job.stage_id)
        .where(
            Stage.lineage_id == job.lineage_id,
            Stage.position < position,
            Job.status.not_in(JOB_TERMINAL),
        )
        .limit(1)
    )
    return blocking is None


def next_runnable_job(session: Session, lineage_id: int) -> Job | None:
    """The lineage's first unfinished job, if it is queued (and so may start now)."""
    job = session.scalar(
        select(Job)
        .join(Stage, Stage.id == Job.stage_id)
        .where(Stage.lineage_id == lineage_id, Job.status.not_in(JOB_TERMINAL))
        .order_by(Stage.position)
        .limit(1)
    )
    return job if job is not None and job.status == JOB_QUEUED else None


def finish_job(
    session: Session,
    job: Job,
    status: str,
    *,
    error: dict[str, Any] | None = None,
    message: str = "",
) -> None:
    """Put ``job`` in a terminal state; on failure/cancel, release its domain name and cancel
    the stages queued behind it."""
    now = utcnow()
    job.status = status
    job.finished_at = now
    job.lease_expires_at = None
    job.claim_token = None
    job.eta_seconds = None
    if error is not None:
        job.error = error
    stage = session.get(Stage, job.stage_id)
    assert stage is not None
    stage.finished_at = now
    level = "info" if status not in (JOB_FAILED,) else "error"
    add_event(
        session,
        job.id,
        status,
        message or f"job {status}",
        level=level,
        data={"error": error} if error else {},
    )
    status_changed(session, job)
    if status == JOB_CANCELLED or status == JOB_FAILED:
        stage.active_name = None
        _cancel_followers(session, stage)


def _cancel_followers(session: Session, stage: Stage) -> None:
    followers = session.scalars(
        select(Job)
        .join(Stage, Stage.id == Job.stage_id)
        .where(
            Stage.lineage_id == stage.lineage_id,
            Stage.position > stage.position,
            Job.status.in_((JOB_QUEUED, JOB_VALIDATING)),
        )
        .order_by(Stage.position)
    ).all()
    for job in followers:
        error = {
            "code": "previous_stage_not_completed",
            "message": f"stage {stage.position} ({stage.name}) did not complete; "
            "submit this domain again to train it",
            "phase": None,
        }
        job.status = JOB_CANCELLED
        job.finished_at = utcnow()
        job.error = error
        follower_stage = session.get(Stage, job.stage_id)
        assert follower_stage is not None
        follower_stage.active_name = None
        follower_stage.finished_at = job.finished_at
        add_event(
            session, job.id, JOB_CANCELLED, error["message"], level="warning", data={"error": error}
        )
        status_changed(session, job)


def request_cancel(session: Session, job: Job) -> None:
    """The API's cancel: a job not yet started ends now; a running one is asked to stop at
    its next step boundary (the worker sees ``cancelling``)."""
    if job.status in (JOB_QUEUED, JOB_VALIDATING):
        finish_job(session, job, JOB_CANCELLED, message="cancelled before it started")
    elif job.status == JOB_RUNNING:
        job.status = JOB_CANCELLING
        add_event(session, job.id, JOB_CANCELLING, "cancellation requested")
        status_changed(session, job)


def jobs_to_enqueue(session: Session, *, stale_before: datetime | None) -> list[int]:
    """What a sweep sends again: runnable queued jobs not sent since ``stale_before`` (all of
    them when None), and running/cancelling jobs whose lease has expired (a dead worker)."""
    now = utcnow()
    queued = select(Job).where(Job.status == JOB_QUEUED)
    if stale_before is not None:
        queued = queued.where(or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale_before))
    ids = [job.id for job in session.scalars(queued.order_by(Job.id)) if is_runnable(session, job)]
    expired = session.scalars(
        select(Job.id).where(
            Job.status.in_((JOB_RUNNING, JOB_CANCELLING)),
            and_(Job.lease_expires_at.is_not(None), Job.lease_expires_at < now),
        )
    ).all()
    return ids + [i for i in expired if i not in ids]


def mark_enqueued(session: Session, job_ids: list[int]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=utcnow()))
