"""What deleting a corpus or a lineage does (plain SQL and files; no HTTP, no Celery).

Rows are kept and marked ``deleted_at`` (their ids answer 404 from then on): stages and
their jobs keep naming the corpus they were trained on, and ids are never handed out again,
so a folder left behind can never be mistaken for a new lineage's. Files go:

- a corpus's file at once (refused while a queued or running stage still needs it);
- a lineage's folder (base copy, stage models, importance snapshots, step checkpoints) at
  once when none of its stages trains; with ``force`` a training stage is cancelled
  cooperatively and the folder goes once its worker has stopped: the worker removes it after
  recording the cancel, and every sweep removes any left behind (both in app/purge.py,
  which the worker imports without the HTTP layer).
"""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.problems import Problem
from service_core.lifecycle import add_event, finish_job, request_cancel
from service_core.models import (
    JOB_CANCELLED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    JOB_TERMINAL,
    JOB_VALIDATING,
    Corpus,
    Job,
    Lineage,
    Stage,
    utcnow,
)
from service_core.purge import TRAINING
from service_core.settings import Settings
from service_core.storage import remove_upload


def _locked_jobs(session: Session, *conditions) -> list[Job]:  # noqa: ANN002
    """Jobs matching ``conditions``, locked against a concurrent claim (PostgreSQL: the
    worker's claim ``UPDATE`` waits, then sees the new status; SQLite: ``BEGIN IMMEDIATE``
    already serialises writers)."""
    return list(session.scalars(select(Job).where(*conditions).with_for_update()))


# -- corpora ---------------------------------------------------------------------------------


def delete_corpus(settings: Settings, session: Session, corpus: Corpus) -> None:
    """Mark the corpus deleted and remove its file; 409 while an unfinished stage (or a
    lineage that has not yet built its general reference) needs it."""
    users = _locked_jobs(
        session,
        Job.status.not_in(JOB_TERMINAL),
        Job.stage_id.in_(
            select(Stage.id).where(
                or_(Stage.corpus_id == corpus.id, Stage.eval_corpus_id == corpus.id)
            )
        ),
    )
    if users:
        raise Problem(
            409,
            "corpus_in_use",
            f"corpus {corpus.public_id} is used by job(s) "
            f"{', '.join(j.public_id for j in sorted(users, key=lambda j: j.id))} that have "
            "not finished; cancel them or wait",
        )
    waiting = session.scalars(
        select(Lineage.public_id)
        .where(
            Lineage.general_corpus_id == corpus.id,
            Lineage.deleted_at.is_(None),
            ~select(Job.id)
            .where(Job.lineage_id == Lineage.id, Job.status == JOB_SUCCEEDED)
            .exists(),
        )
        .order_by(Lineage.id)
    ).all()
    if waiting:
        raise Problem(
            409,
            "corpus_in_use",
            f"corpus {corpus.public_id} is the general corpus of lineage(s) {', '.join(waiting)}, "
            "which read it when their first stage trains",
        )
    corpus.deleted_at = utcnow()
    session.flush()
    remove_upload(settings, corpus.storage_path)


# -- lineages --------------------------------------------------------------------------------


def delete_lineage(session: Session, lineage: Lineage, *, force: bool) -> list[int]:
    """Cancel the lineage's queued jobs, ask its training one to stop (only with ``force``:
    409 otherwise) and mark it deleted. Returns the ids of the jobs still training."""
    jobs = _locked_jobs(session, Job.lineage_id == lineage.id, Job.status.not_in(JOB_TERMINAL))
    training = [j for j in jobs if j.status in TRAINING]
    if training and not force:
        raise Problem(
            409,
            "lineage_training",
            f"job {training[0].public_id} of lineage {lineage.public_id} is training; cancel it "
            "first, "
            "or delete with ?force=true (the job is cancelled, the files go once it stopped)",
        )
    # the last stage first, so that each queued job says why it was cancelled itself
    for job in sorted(jobs, key=lambda j: j.id, reverse=True):
        if job.status in (JOB_QUEUED, JOB_VALIDATING):
            finish_job(session, job, JOB_CANCELLED, message="cancelled: the lineage was deleted")
        elif job.status == JOB_RUNNING:
            request_cancel(session, job)
            add_event(session, job.id, "lineage_deleted", "the lineage was deleted (force)")
    lineage.deleted_at = utcnow()
    session.flush()
    return [j.id for j in training]
