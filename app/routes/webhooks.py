"""/v1/webhooks: an owner's endpoints told of job status changes, and their delivery log.

The signing secret is shown once, in the answer that creates (or rotates) it. A URL whose
host is not public is refused unless the operator allows it (service_core.webhook_urls).
These POSTs ignore ``Idempotency-Key``: replaying one would need the secret stored with it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.path_ids import WebhookPath
from app.presenters import json_ok
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, bad_cursor, owned, paginate
from app.quotas import lock_owner
from app.ratelimit import write_access
from app.schemas import Page
from app.schemas_lifecycle import problem_responses
from app.schemas_webhooks import (
    DeliveryOut,
    DeliveryStatus,
    WebhookCreate,
    WebhookCreated,
    WebhookEvent,
    WebhookOut,
)
from service_core.models import (
    DELIVERY_CANCELLED,
    DELIVERY_PENDING,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from service_core.settings import Settings
from service_core.webhook_events import EVENT_TYPES, new_secret
from service_core.webhook_urls import registration_problem

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
# what the service sends (the OpenAPI document's top-level `webhooks`)
events = APIRouter()

CURSOR = Query(None, max_length=64, description="cursor: `next_after` of a page")
LIMIT = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="page size")


def webhook_out(row: WebhookEndpoint) -> WebhookOut:
    return WebhookOut(
        id=row.public_id,
        url=row.url,
        events=list(row.events or ()),
        description=row.description or "",
        created_at=row.created_at,
        secret_rotated_at=row.secret_rotated_at,
    )


def _created(row: WebhookEndpoint) -> dict:
    return WebhookCreated(**webhook_out(row).model_dump(), secret=row.secret).model_dump(
        mode="json"
    )


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.event_id,
        event_id=row.event_id,
        event_type=row.event_type,
        job_id=row.job_public_id,
        status=row.status,
        attempts=row.attempts or 0,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at if row.status == DELIVERY_PENDING else None,
        last_attempt_at=row.last_attempt_at,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


def owned_webhook(session: Session, webhook_id: str, owner: str) -> WebhookEndpoint:
    return owned(session, WebhookEndpoint, webhook_id, owner, "webhook")


def _check_url(settings: Settings, url: str) -> None:
    why = registration_problem(url, allow_private=settings.webhook_allow_private)
    if why:
        raise Problem(
            422,
            "invalid_webhook_url",
            f"url: {why}",
            errors=[{"field": "url", "message": why}],
        )


def _check_count(settings: Settings, session: Session, owner: str) -> None:
    limit = settings.webhook_max_endpoints
    if not limit:
        return
    lock_owner(session, owner)
    count = session.scalar(
        select(func.count(WebhookEndpoint.id)).where(
            WebhookEndpoint.owner == owner, WebhookEndpoint.deleted_at.is_(None)
        )
    )
    if (count or 0) >= limit:
        raise Problem(
            403,
            "webhook_limit_reached",
            f"you have {count} webhook endpoints; this server allows {limit} per owner "
            "(DAS_WEBHOOK_MAX_ENDPOINTS_PER_OWNER): delete one first",
            limit=limit,
            value=(count or 0) + 1,
        )


@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    summary="Register a webhook endpoint (its signing secret is shown once)",
    description="201 with the endpoint and its signing secret, shown only in this answer. "
    "Every status change of your jobs (`job.queued`, `job.running`, `job.cancelling`, "
    "`job.succeeded`, `job.failed`, `job.cancelled`; `events` picks some) is POSTed to `url` "
    "as JSON, signed per Standard Webhooks, and retried with back-off. 422 "
    "`invalid_webhook_url` for a URL that is not http(s), or whose host is not public "
    "(unless the server allows private addresses). Not idempotent.",
)
def create_webhook(
    body: WebhookCreate, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    settings: Settings = request.app.state.settings
    _check_url(settings, body.url)  # before the transaction: it may wait for DNS
    events = list(dict.fromkeys(body.events)) if body.events else list(EVENT_TYPES)
    with request.app.state.session_factory() as session, session.begin():
        _check_count(settings, session, principal.owner)
        row = WebhookEndpoint(
            owner=principal.owner,
            url=body.url,
            events=events,
            description=body.description,
            secret=new_secret(),
        )
        session.add(row)
        session.flush()
        answer = _created(row)
    return JSONResponse(answer, status_code=201)


@router.get(
    "",
    response_model=Page[WebhookOut],
    summary="List your webhook endpoints (never their secrets)",
    description="Your endpoints, oldest first, a page at a time (`after` = `next_after`).",
)
def list_webhooks(
    after: str | None = CURSOR,
    limit: int = LIMIT,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    stmt = select(WebhookEndpoint).where(
        WebhookEndpoint.owner == principal.owner, WebhookEndpoint.deleted_at.is_(None)
    )
    rows, has_more, cursor = paginate(session, stmt, WebhookEndpoint, after, limit, principal.owner)
    return json_ok(
        Page[WebhookOut](data=[webhook_out(r) for r in rows], has_more=has_more, next_after=cursor)
    )


@router.get(
    "/{webhook_id}",
    response_model=WebhookOut,
    summary="A webhook endpoint (never its secret)",
    description="The endpoint's URL, event types, description and dates; 404 "
    "`webhook_not_found` for another owner's or a deleted one.",
)
def get_webhook(
    webhook_id: WebhookPath,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    return json_ok(webhook_out(owned_webhook(session, webhook_id, principal.owner)))


@router.delete(
    "/{webhook_id}",
    status_code=204,
    responses=problem_responses(429),
    summary="Delete a webhook endpoint (its pending deliveries are cancelled)",
    description="204; no event is sent to it any more, its pending deliveries end "
    "`cancelled`, and it answers 404 from then on (its id is never reused).",
)
def delete_webhook(
    webhook_id: WebhookPath, request: Request, principal: Principal = Depends(write_access)
) -> Response:
    with request.app.state.session_factory() as session, session.begin():
        row = owned_webhook(session, webhook_id, principal.owner)
        row.deleted_at = utcnow()
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == row.id,
                WebhookDelivery.status == DELIVERY_PENDING,
            )
            .values(status=DELIVERY_CANCELLED, next_attempt_at=None)
        )
    return Response(status_code=204)


@router.post(
    "/{webhook_id}/rotate-secret",
    response_model=WebhookCreated,
    summary="Replace a webhook endpoint's signing secret (the new one is shown once)",
    description="200 with the endpoint and its new secret, shown only in this answer; "
    "every delivery from then on (retries included) is signed with it alone.",
)
def rotate_webhook_secret(
    webhook_id: WebhookPath, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    with request.app.state.session_factory() as session, session.begin():
        row = owned_webhook(session, webhook_id, principal.owner)
        row.secret = new_secret()
        row.secret_rotated_at = utcnow()
        session.flush()
        answer = _created(row)
    return JSONResponse(answer)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=Page[DeliveryOut],
    summary="A webhook endpoint's delivery log",
    description="Its deliveries, oldest first: event type, job, attempts, the latest status "
    "code or error, the next attempt's time and when it was delivered.",
)
def list_deliveries(
    webhook_id: WebhookPath,
    status: DeliveryStatus | None = Query(  # type: ignore[valid-type]
        None, description="only the deliveries in this state"
    ),
    after: str | None = CURSOR,
    limit: int = LIMIT,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    endpoint = owned_webhook(session, webhook_id, principal.owner)
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    if after:  # the event id of the previous page's last delivery, of this endpoint
        row_id = session.scalar(
            select(WebhookDelivery.id).where(
                WebhookDelivery.event_id == after, WebhookDelivery.endpoint_id == endpoint.id
            )
        )
        if row_id is None:
            raise bad_cursor()
        stmt = stmt.where(WebhookDelivery.id > row_id)
    rows = list(session.scalars(stmt.order_by(WebhookDelivery.id).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    cursor = rows[-1].event_id if has_more and rows else None
    return json_ok(
        Page[DeliveryOut](
            data=[delivery_out(r) for r in rows], has_more=has_more, next_after=cursor
        )
    )


@events.post(
    "job-status-changed",
    summary="A job's status changed (sent to your webhook endpoints)",
    description="POSTed to each of your endpoints that takes the event's `type`, as JSON, "
    "with the headers `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,` + "
    "base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` with the key in your "
    "secret). Answer 2xx within the timeout; anything else is retried with back-off.",
    status_code=200,
)
def job_status_changed(body: WebhookEvent) -> None:
    """Documentation only: the service calls your URL, no route of it answers here."""
