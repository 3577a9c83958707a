"""Request and response bodies of /v1/webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import JobOut, StorableText
from service_core.models import DELIVERY_STATUSES
from service_core.webhook_events import EVENT_TYPES
from service_core.webhook_urls import MAX_URL_CHARS

EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
DeliveryStatus = Literal[DELIVERY_STATUSES]  # type: ignore[valid-type]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://example.com/das-hooks",
                    "events": ["job.succeeded", "job.failed"],
                    "description": "CI pipeline",
                }
            ]
        },
    )

    url: StorableText = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="an http:// or https:// URL (no credentials, no #fragment); by default "
        "its host must resolve to public addresses only",
    )
    events: list[EventType] | None = Field(
        None,
        min_length=1,
        max_length=len(EVENT_TYPES),
        description="the event types to send (default: all of them, one per job status)",
    )
    description: StorableText = Field(
        "", max_length=500, description="a note for you (any valid Unicode)"
    )


class WebhookOut(BaseModel):
    id: str = Field(description="the endpoint id (`whk_…`)", examples=["whk_2JdW9kLq4RtX7vBn0PyS"])
    url: str = Field(description="where events are POSTed")
    events: list[str] = Field(description="the event types it receives")
    description: str = Field(description="your note")
    created_at: datetime = Field(description="registration time (UTC)")
    secret_rotated_at: datetime | None = Field(description="the latest secret rotation")


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="the signing secret (`whsec_` + base64 key), shown only in this answer"
    )


class DeliveryOut(BaseModel):
    id: str = Field(
        description="the delivery id: its event's `webhook-id` (use as the `after` cursor)"
    )
    event_id: str = Field(description="the event's `id` and `webhook-id` header")
    event_type: str = Field(description="`job.running`, `job.succeeded`, ...")
    job_id: str = Field(description="the job whose status changed (`job_…`)")
    status: DeliveryStatus = Field(  # type: ignore[valid-type]
        description="`pending` (due at `next_attempt_at`), `delivered` (a 2xx answer), "
        "`failed` (no 2xx after the last attempt) or `cancelled` (the endpoint was deleted)"
    )
    attempts: int = Field(description="attempts made so far")
    last_status_code: int | None = Field(description="the HTTP status of the latest answer")
    last_error: str | None = Field(
        description="why the latest attempt got no answer: `timeout`, `connect_error`, "
        "`unsafe_address`, `name_resolution`, ..."
    )
    next_attempt_at: datetime | None = Field(description="when it is tried next (pending)")
    last_attempt_at: datetime | None = Field(description="the latest attempt")
    created_at: datetime = Field(description="when the event happened (UTC)")
    delivered_at: datetime | None = Field(description="when a 2xx answer came")


class WebhookEventData(BaseModel):
    job: JobOut = Field(description="the job as `GET /v1/jobs/{id}` showed it at the change")


class WebhookEvent(BaseModel):
    """What an endpoint receives (signed per Standard Webhooks: ``webhook-id``,
    ``webhook-timestamp``, ``webhook-signature`` headers)."""

    id: str = Field(description="the event id, also the `webhook-id` header (deduplicate on it)")
    type: EventType = Field(description="`job.` + the job's new status")  # type: ignore[valid-type]
    created_at: datetime = Field(description="when the status changed (UTC)")
    data: WebhookEventData = Field(description="the job")
