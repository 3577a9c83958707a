"""Webhook events: which exist, how one is written to the outbox, how it is signed.

An event is written in the transaction that changes the job's status (one delivery row per
endpoint of the job's owner that takes that event type), so that no status change is lost
to a process that dies, and none is announced that was rolled back. Its body is fixed then:
``{"id", "type", "created_at", "data": {"job": <the job as GET /v1/jobs/{id} shows it>}}``.

Signatures follow the Standard Webhooks scheme: headers ``webhook-id``,
``webhook-timestamp`` (Unix seconds) and ``webhook-signature`` =
``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where the key is the
base64-decoded part of the endpoint's secret after ``whsec_``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service_core.job_view import job_out
from service_core.models import (
    JOB_STATUSES,
    JOB_VALIDATING,
    Job,
    Stage,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)

SECRET_PREFIX = "whsec_"
# one event type per status a job is reported in (`validating` never is: a job is validated
# in the request that creates it)
EVENT_TYPES = tuple(f"job.{status}" for status in JOB_STATUSES if status != JOB_VALIDATING)


def event_type(status: str) -> str:
    return f"job.{status}"


def new_event_id() -> str:
    """The ``webhook-id`` of one event for one endpoint: random, the same for every attempt
    (receivers use it to ignore a delivery they already processed)."""
    return "evt_" + secrets.token_hex(12)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def encode_body(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def record_job_status(session: Session, job: Job) -> int:
    """Queue the event of ``job``'s current status for each endpoint of its owner that takes
    it; returns how many. Call in the transaction that set the status."""
    type_ = event_type(job.status)
    endpoints = [
        e
        for e in session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.owner == job.owner, WebhookEndpoint.deleted_at.is_(None))
            .order_by(WebhookEndpoint.id)
        )
        if type_ in (e.events or ())
    ]
    if not endpoints:
        return 0
    session.flush()  # the job's id, defaults and updated_at as they will be stored
    # and every other column as committed now: the row is locked by our flush, but the
    # worker's heartbeat may have committed after ``job`` was loaded (the body would then
    # show an older heartbeat_at than the job's own read, a moment later)
    session.refresh(job)
    stage = session.get(Stage, job.stage_id)
    assert stage is not None
    body = job_out(job, stage).model_dump(mode="json")
    now = utcnow()
    for endpoint in endpoints:
        event_id = new_event_id()
        payload = {
            "id": event_id,
            "type": type_,
            "created_at": now.isoformat().replace("+00:00", "Z"),
            "data": {"job": body},
        }
        session.add(
            WebhookDelivery(
                endpoint_id=endpoint.id,
                event_id=event_id,
                event_type=type_,
                job_id=job.id,
                payload=payload,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(endpoints)
