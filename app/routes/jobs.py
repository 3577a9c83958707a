"""/v1/jobs: status, events (a page, or a live stream of server-sent events), cancellation.

Both reads carry an ``ETag``; a poll with ``If-None-Match`` gets ``304 Not Modified`` while
nothing changed (answered cheaply by app.conditional_reads when the job is watched).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.idempotency import IdempotencyScope, idempotency_header, request_hash
from app.job_watch import JobWatcher, etag_matches, events_etag, job_etag, sse_frame
from app.path_ids import JobPath
from app.presenters import event_out, job_out, json_ok
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, owned_job, parse_seq
from app.ratelimit import write_access
from app.schemas import JobEventOut, JobOut, Page
from service_core.lifecycle import request_cancel
from service_core.models import JOB_TERMINAL, JobEvent

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


NOT_MODIFIED = {304: {"description": "not modified: the `If-None-Match` tag is current"}}
STREAM = {
    200: {
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {"type": "string"},
                "description": "with `stream=true`: one `message` per job event (`id:` = "
                "the event id, `data:` = the event as JSON), an `event: job` with the job "
                "whenever it changes, and `event: end` with the final job",
            },
        }
    }
}


def _not_modified(etag: str) -> Response:
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})


def _tagged(body: JSONResponse, etag: str) -> JSONResponse:
    body.headers["ETag"] = etag
    body.headers["Cache-Control"] = "no-cache"
    return body


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses=NOT_MODIFIED,
    summary="A job's status and progress",
    description="The job's status, phase, progress, step, loss, ETA and error. Carries an "
    "`ETag`: send it back as `If-None-Match` to get `304` (no body) while nothing changed.",
)
def get_job(
    job_id: JobPath,
    request: Request,
    if_none_match: str | None = Header(
        None, description="an `ETag` from an earlier answer: 304 if still current"
    ),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> Response:
    job, stage = owned_job(session, job_id, principal.owner)
    body = job_out(job, stage).model_dump(mode="json")
    etag = job_etag(body)
    # a poller: watch the job so that its next read is answered from the watch, without
    # the database (app.conditional_reads)
    request.app.state.job_watcher.start_from_thread(job.public_id)
    if etag_matches(if_none_match, etag):
        return _not_modified(etag)
    return _tagged(JSONResponse(body), etag)


def _newest_seq(session: Session, job_row_id: int) -> int:
    """The number of the job's newest committed event (0: none yet)."""
    return session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_row_id)) or 0


async def _stream(
    watcher: JobWatcher, job_id: str, after: int, keepalive: float, max_seconds: float
) -> AsyncIterator[bytes]:
    """The stream ends with ``event: end`` once the job is finished; a stream still open
    after ``max_seconds`` is closed without it (EventSource then reconnects)."""
    yield b"retry: 2000\n\n"
    last_job: dict | None = None
    deadline = time.monotonic() + max_seconds
    async for kind, payload, frame in watcher.follow(job_id, after, min(keepalive, max_seconds)):
        if kind == "job":
            last_job = payload
        yield frame
        if time.monotonic() > deadline:
            return
    yield sse_frame("end", last_job or {})


@router.get(
    "/{job_id}/events",
    response_model=Page[JobEventOut],
    responses={**NOT_MODIFIED, **STREAM},
    summary="A job's event log, as pages or as a live stream",
    description="Events are numbered 1, 2, ... within the job (`id`). Without `stream`: a "
    "page of events in that order after the cursor `after` "
    "(with an `ETag`; `If-None-Match` gives `304` while no new event exists). With "
    "`stream=true`: `text/event-stream` (server-sent events) of every event after `after` "
    "(or the `Last-Event-ID` header), live, plus the job itself whenever it changes; the "
    "stream ends (`event: end`) when the job is finished and every event was sent. A "
    "reconnection to a finished job with nothing new answers 204, which stops EventSource.",
)
def list_events(
    job_id: JobPath,
    request: Request,
    after: str | None = Query(
        None, max_length=18, pattern=r"^[0-9]*$", description="cursor: events after this number"
    ),
    limit: int = Query(
        DEFAULT_LIMIT * 5, ge=1, le=MAX_LIMIT * 5, description="page size (not for streams)"
    ),
    stream: bool = Query(False, description="answer with a live text/event-stream"),
    if_none_match: str | None = Header(
        None, description="an `ETag` from an earlier page: 304 while no new event exists"
    ),
    last_event_id: str | None = Header(
        None, max_length=18, description="stream resume point (EventSource sends it)"
    ),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> Response:
    job, _ = owned_job(session, job_id, principal.owner)
    if stream:
        resume = last_event_id if last_event_id is not None else after
        start = parse_seq(resume.strip() if resume else None)
        if last_event_id is not None and job.status in JOB_TERMINAL:
            if start >= _newest_seq(session, job.id):
                return Response(status_code=204)  # EventSource: do not reconnect
        settings = request.app.state.settings
        # the session's pooled connection goes back now, not when the stream ends: N open
        # streams would otherwise hold N connections and starve every other request
        session.close()
        return StreamingResponse(
            _stream(
                request.app.state.job_watcher,
                job.public_id,
                start,
                settings.stream_keepalive_seconds,
                settings.stream_max_seconds,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    newest = _newest_seq(session, job.id)
    start = parse_seq(after)
    etag = events_etag(job.public_id, newest, start, limit)
    request.app.state.job_watcher.start_from_thread(job.public_id)  # next page: from the watch
    if etag_matches(if_none_match, etag):
        return _not_modified(etag)
    rows = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.seq > start, JobEvent.seq <= newest)
            .order_by(JobEvent.seq)
            .limit(limit + 1)
        )
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    cursor = str(rows[-1].seq) if has_more and rows else None
    return _tagged(
        json_ok(
            Page[JobEventOut](
                data=[event_out(e, request.app.state.settings) for e in rows],
                has_more=has_more,
                next_after=cursor,
            )
        ),
        etag,
    )


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    summary="Cancel a job (cooperative: it stops at the next step boundary)",
    dependencies=[Depends(idempotency_header)],
)
def cancel_job(
    job_id: JobPath,
    request: Request,
    principal: Principal = Depends(write_access),
) -> JSONResponse:
    """Cancel a job: one not started yet ends `cancelled` at once, a running one becomes
    `cancelling` and stops at its next step boundary. The stages queued behind it are cancelled
    too. Honours `Idempotency-Key`.
    """
    factory = request.app.state.session_factory
    scope = IdempotencyScope.from_request(request, principal.owner)

    def produce() -> dict:
        with factory() as session, session.begin():
            job, stage = owned_job(session, job_id, principal.owner)
            if job.status in JOB_TERMINAL:
                raise Problem(409, "job_finished", f"job {job_id} already {job.status}")
            request_cancel(session, job)
            session.flush()
            request.app.state.job_watcher.forget(job.public_id)  # read-your-writes
            return job_out(job, stage).model_dump(mode="json")

    return scope.run(request_hash(scope.endpoint, None), 202, produce)
