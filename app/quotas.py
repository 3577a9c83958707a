"""Per-owner quotas, checked in the request that would exceed them (a limit of 0 is none).

- tokens one job may process (``max_steps * batch_size * grad_accum * block_size``):
  422 ``job_token_limit_exceeded`` -- the request itself asks too much;
- jobs not yet finished: 429 ``too_many_active_jobs`` with ``Retry-After`` -- wait for one;
- bytes of uploaded corpora: 403 ``storage_quota_exceeded`` -- free some first.

Each answer carries ``limit`` and ``value`` (what the request would bring the figure to).
The count and the insert happen in one transaction; on PostgreSQL an advisory lock per owner
makes two concurrent requests of one owner take turns (SQLite's ``BEGIN IMMEDIATE`` already
does), so concurrent requests cannot both slip under a limit.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.problems import Problem
from service_core.models import JOB_TERMINAL, Corpus, Job
from service_core.settings import Settings


def lock_owner(session: Session, owner: str) -> None:
    """Serialise this owner's quota-checked writes until the transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})


def job_tokens(config: object) -> int | None:
    """Tokens a job of ``config`` processes when ``max_steps`` fixes its length."""
    steps = getattr(config, "max_steps", None)
    if steps is None:
        return None
    return int(steps) * config.batch_size * config.grad_accum * config.block_size  # type: ignore[attr-defined]


def check_job_tokens(settings: Settings, tokens: int | None, *, estimated: bool = False) -> None:
    limit = settings.max_job_tokens
    if not limit or tokens is None or tokens <= limit:
        return
    how = "about " if estimated else ""
    message = (
        f"the job would process {how}{tokens} tokens (max_steps x batch_size x grad_accum x "
        f"block_size{', epochs over the corpus' if estimated else ''}); this server allows "
        f"{limit} per job (DAS_MAX_JOB_TOKENS)"
    )
    raise Problem(
        422,
        "job_token_limit_exceeded",
        message,
        errors=[{"field": "hyperparameters.max_steps", "message": message}],
        limit=limit,
        value=tokens,
    )


def active_jobs(session: Session, owner: str) -> int:
    return int(
        session.scalar(
            select(func.count(Job.id)).where(Job.owner == owner, Job.status.not_in(JOB_TERMINAL))
        )
        or 0
    )


def check_active_jobs(settings: Settings, session: Session, owner: str, *, adding: int) -> None:
    """429 when ``adding`` more jobs would pass the owner's limit of unfinished jobs."""
    limit = settings.max_active_jobs
    if not limit:
        return
    value = active_jobs(session, owner) + adding
    if value > limit:
        raise Problem(
            429,
            "too_many_active_jobs",
            f"you have {value - adding} unfinished job(s) (queued, running or cancelling); "
            f"this server allows {limit} per owner (DAS_MAX_ACTIVE_JOBS_PER_OWNER): retry once "
            "one has finished",
            headers={"Retry-After": "30"},
            limit=limit,
            value=value,
        )


def storage_used(session: Session, owner: str) -> int:
    return int(
        session.scalar(
            select(func.coalesce(func.sum(Corpus.bytes), 0)).where(Corpus.owner == owner)
        )
        or 0
    )


def check_storage(settings: Settings, session: Session, owner: str, *, adding: int) -> None:
    """403 when storing ``adding`` more bytes would pass the owner's storage quota."""
    limit = settings.max_storage_bytes
    if not limit:
        return
    used = storage_used(session, owner)
    value = used + adding
    if value > limit if adding else used >= limit:
        raise Problem(
            403,
            "storage_quota_exceeded",
            f"your corpora take {used} bytes"
            + (f"; this upload of {adding} bytes would make {value}" if adding else "")
            + f"; this server allows {limit} per owner (DAS_MAX_STORAGE_BYTES_PER_OWNER)",
            limit=limit,
            value=value,
            used=used,
        )
