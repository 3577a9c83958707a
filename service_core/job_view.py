"""A job as users see it: the body of ``GET /v1/jobs/{id}``, also the ``data.job`` of a
webhook event. Here, not in ``app``, because the worker builds webhook events too (in the
transaction that changes the job's status) and must not import the HTTP layer."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from service_core.models import Job, Stage
from service_core.redaction import scrub_data


class JobError(BaseModel):
    code: str = Field(description="stable error code (see the service documentation)")
    message: str = Field(description="what went wrong")
    phase: str | None = Field(None, description="the phase it failed in")
    correlation_id: str | None = Field(
        None,
        description="internal errors: the key to the server log's entry (the traceback is "
        "never shown)",
    )


class JobOut(BaseModel):
    id: str = Field(description="the job id (`job_…`)", examples=["job_Q7mN4pLs2XcV9bKd1FhJ"])
    lineage_id: str = Field(
        description="its lineage (`lin_…`)", examples=["lin_3hGk9PqRt2VwXy5ZaB1c"]
    )
    stage_position: int = Field(description="the position of its stage in the lineage (from 1)")
    domain: str = Field(description="its stage's domain name")
    status: Literal[
        "validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"
    ] = Field(
        description="`queued` -> `running` -> `succeeded` | `failed` | `cancelled` (through "
        "`cancelling`); a job is validated in the request that creates it, so it starts "
        "`queued` (`validating` is never reported)"
    )
    phase: (
        Literal["preparing", "importance", "scoring", "training", "evaluating", "end_task"] | None
    ) = Field(
        description="what a running job does (in this order; see the service documentation "
        "for the share of `progress` each one covers)"
    )
    progress: float = Field(ge=0.0, le=1.0, description="0 to 1, only moves forward")
    step: int | None = Field(description="training steps done")
    total_steps: int | None = Field(description="training steps planned")
    loss: float | None = Field(description="the latest training loss")
    trained_tokens: int = Field(description="tokens trained on so far")
    eta_seconds: float | None = Field(description="estimated seconds left")
    error: JobError | None = Field(description="why it failed or was cancelled")
    attempts: int = Field(description="claims by a worker (more than 1: it was resumed)")
    created_at: datetime = Field(description="creation time (UTC)")
    started_at: datetime | None = Field(description="first claim by a worker")
    finished_at: datetime | None = Field(description="when it reached a final status")
    heartbeat_at: datetime | None = Field(description="its worker's latest heartbeat")
    updated_at: datetime = Field(description="latest change")


def job_out(job: Job, stage: Stage) -> JobOut:
    return JobOut(
        id=job.public_id,
        lineage_id=job.lineage_public_id,
        stage_position=stage.position,
        domain=stage.name,
        status=job.status,
        phase=job.phase,
        progress=min(1.0, max(0.0, job.progress or 0.0)),
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss,
        trained_tokens=job.trained_tokens or 0,
        eta_seconds=job.eta_seconds,
        error=JobError(**scrub_data(job.error)) if job.error else None,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
        updated_at=job.updated_at,
    )
