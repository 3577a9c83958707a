"""/v1/jobs: status, events, cancellation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.idempotency import IdempotencyScope, request_hash
from app.lifecycle import request_cancel
from app.models import JOB_TERMINAL, JobEvent
from app.presenters import event_out, job_out, json_ok
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, owned_job, paginate
from app.ratelimit import write_access
from app.schemas import JobEventOut, JobOut, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut, summary="A job's status and progress")
def get_job(
    job_id: int,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    job, stage = owned_job(session, job_id, principal.owner)
    return json_ok(job_out(job, stage))


@router.get("/{job_id}/events", response_model=Page[JobEventOut], summary="A job's event log")
def list_events(
    job_id: int,
    request: Request,
    after: str | None = Query(None, max_length=18, pattern=r"^[0-9]*$"),
    limit: int = Query(DEFAULT_LIMIT * 5, ge=1, le=MAX_LIMIT * 5),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    job, _ = owned_job(session, job_id, principal.owner)
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    rows, has_more, cursor = paginate(session, stmt, JobEvent.id, after, limit)
    return json_ok(
        Page[JobEventOut](
            data=[event_out(e, request.app.state.settings) for e in rows],
            has_more=has_more,
            next_after=cursor,
        )
    )


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    summary="Cancel a job (cooperative: it stops at the next step boundary)",
)
def cancel_job(
    job_id: int,
    request: Request,
    principal: Principal = Depends(write_access),
) -> JSONResponse:
    factory = request.app.state.session_factory
    scope = IdempotencyScope.from_request(request, principal.owner)

    def produce() -> dict:
        with factory() as session, session.begin():
            job, stage = owned_job(session, job_id, principal.owner)
            if job.status in JOB_TERMINAL:
                raise Problem(409, "job_finished", f"job {job_id} already {job.status}")
            request_cancel(session, job)
            session.flush()
            return job_out(job, stage).model_dump(mode="json")

    return scope.run(request_hash(scope.endpoint, None), 202, produce)
