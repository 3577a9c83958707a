"""What deleting a corpus or a lineage does (plain SQL and files; no HTTP, no Celery).

Rows are kept and marked ``deleted_at`` (their ids answer 404 from then on): stages and
their jobs keep naming the corpus they were trained on, and ids are never handed out again,
so a folder left behind can never be mistaken for a new lineage's. Files go:

- a corpus's file at once (refused while a queued or running stage still needs it);
- a lineage's folder (base copy, stage models, importance snapshots, step checkpoints) at
  once when none of its stages trains; with ``force`` a training stage is cancelled
  cooperatively and the folder goes once its worker has stopped: the worker removes it after
  recording the cancel (``purge_lineage``), and every sweep removes any left behind
  (``purge_deleted_lineages``).
"""

from __future__ import annotations

import logging

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from app.lifecycle import add_event, finish_job, request_cancel
from app.models import (
    JOB_CANCELLED,
    JOB_CANCELLING,
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
from app.problems import Problem
from app.settings import Settings
from app.storage import lineage_dir, remove_lineage_tree, remove_upload

log = logging.getLogger("das.deletion")

TRAINING = (JOB_RUNNING, JOB_CANCELLING)


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
            f"corpus {corpus.id} is used by job(s) {sorted(j.id for j in users)} that have "
            "not finished; cancel them or wait",
        )
    waiting = session.scalars(
        select(Lineage.id).where(
            Lineage.general_corpus_id == corpus.id,
            Lineage.deleted_at.is_(None),
            ~select(Job.id)
            .where(Job.lineage_id == Lineage.id, Job.status == JOB_SUCCEEDED)
            .exists(),
        )
    ).all()
    if waiting:
        raise Problem(
            409,
            "corpus_in_use",
            f"corpus {corpus.id} is the general corpus of lineage(s) {sorted(waiting)}, "
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
            f"job {training[0].id} of lineage {lineage.id} is training; cancel it first, "
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


def purge_lineage(settings: Settings, factory: sessionmaker[Session], lineage_id: int) -> bool:
    """Remove a deleted lineage's folder once none of its jobs trains; True when removed
    now. Safe to call for any lineage (it does nothing unless the lineage is deleted)."""
    with factory() as session:
        lineage = session.get(Lineage, lineage_id)
        if lineage is None or lineage.deleted_at is None:
            return False
        busy = session.scalar(
            select(Job.id).where(Job.lineage_id == lineage_id, Job.status.in_(TRAINING)).limit(1)
        )
    if busy is not None:
        return False
    if not remove_lineage_tree(lineage_dir(settings, lineage_id)):
        log.info("lineage %s: folder still locked by a trainer; removed later", lineage_id)
        return False
    with factory() as session, session.begin():
        row = session.get(Lineage, lineage_id)
        if row is not None and row.files_removed_at is None:
            row.files_removed_at = utcnow()
    return True


def purge_deleted_lineages(settings: Settings, factory: sessionmaker[Session]) -> list[int]:
    """The sweep's part: remove the folders of deleted lineages whose last job stopped."""
    with factory() as session:
        pending = session.scalars(
            select(Lineage.id).where(
                Lineage.deleted_at.is_not(None), Lineage.files_removed_at.is_(None)
            )
        ).all()
    return [i for i in pending if purge_lineage(settings, factory, i)]
