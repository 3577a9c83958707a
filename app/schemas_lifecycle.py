"""Request and response bodies of the lifecycle routes: fork, checkpoints, per-step
metrics, API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import StorableText


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error codes a route answers beyond those ``app.main`` documents
    for every route (DELETE is not a POST there)."""
    entry = {
        "description": "an error (RFC 9457 problem details)",
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    return {code: dict(entry) for code in codes}


class ForkCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "demo-branch", "from_stage": 1}]},
    )

    name: StorableText = Field(
        min_length=1, max_length=200, description="the new lineage's name (any valid Unicode)"
    )
    from_stage: int | str = Field(
        description="the parent's stage to branch after: its position (1, 2, ...) or its "
        "domain name; it must have succeeded"
    )
    from_checkpoint: int | None = Field(
        None,
        ge=1,
        description="a training step of that stage; only its final step is supported (the "
        "engine deletes step checkpoints when a stage finishes)",
    )

    def stage_name(self) -> str | None:
        if isinstance(self.from_stage, str) and not self.from_stage.isdigit():
            return self.from_stage
        return None


class CheckpointOut(BaseModel):
    step: int
    final: bool
    available: bool = Field(description="the files are on the server now")
    downloadable: bool
    download_url: str | None
    created_at: datetime | None


class CheckpointList(BaseModel):
    job_id: str = Field(description="the job (`job_…`)")
    lineage_id: str = Field(description="its lineage (`lin_…`)")
    stage_position: int
    data: list[CheckpointOut]


class StepMetric(BaseModel):
    step: int
    total_steps: int | None
    train_loss: float | None
    tokens_per_s: float | None
    trained_tokens: int | None
    learning_rate: float | None = Field(None, description="not reported by the engine: null")
    elapsed_s: float | None = Field(description="seconds since the job started")


class JobMetricsOut(BaseModel):
    job_id: str = Field(description="the job (`job_…`)")
    lineage_id: str = Field(description="its lineage (`lin_…`)")
    stage_position: int
    domain: str
    status: str
    every_steps: int = Field(description="the server's DAS_EVENT_EVERY_STEPS")
    series: list[StepMetric]
    eval_loss: float | None = Field(description="held-out loss on this stage's own domain")
    eval_losses: dict[str, float | None] = Field(
        description="held-out loss of this stage's model on every domain of the lineage "
        "(a later domain's cell is filled in when that domain is trained)"
    )
    general_loss: float | None


class ApiKeyOut(BaseModel):
    id: str = Field(description="the key's id (`key_…`), for revoke and rotate")
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the secret, shown this once; only its SHA-256 is stored")
