"""Request and response bodies (pydantic), apart from the database rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from das_engine.config import STRATEGIES

T = TypeVar("T")
# every strategy the engine ships (das, ncl, one and the paper's baselines)
StrategyName = Literal[STRATEGIES]  # type: ignore[valid-type]

DOMAIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    next_after: str | None = Field(
        None, description="pass as `after` to get the next page; null on the last page"
    )


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


# -- base models --------------------------------------------------------------------------


class BaseModelOut(BaseModel):
    id: str
    architecture: str
    objective: Literal["mlm", "clm"]
    parameters: int


# -- corpora ------------------------------------------------------------------------------


class CorpusOut(BaseModel):
    id: int
    filename: str
    format: str
    compressed: bool
    bytes: int
    sha256: str
    documents: int
    characters: int
    status: str
    report: dict[str, Any]
    created_at: datetime


# -- lineages -----------------------------------------------------------------------------


class LineageCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "demo",
                    "base_model": "tiny-roberta",
                    "strategy": "das",
                    "hyperparameters": {"max_steps": 20, "batch_size": 8, "block_size": 32},
                }
            ]
        },
    )

    name: str = Field(min_length=1, max_length=200)
    base_model: str = Field(min_length=1, max_length=500)
    strategy: StrategyName = "das"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    general_corpus_id: int | None = None


class JobError(BaseModel):
    code: str
    message: str
    phase: str | None = None
    # internal errors: the key to the server log's entry (the traceback is never shown)
    correlation_id: str | None = None


class JobOut(BaseModel):
    id: int
    lineage_id: int
    stage_position: int
    domain: str
    status: Literal[
        "validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"
    ]
    phase: Literal["preparing", "importance", "scoring", "training", "evaluating"] | None
    progress: float = Field(ge=0.0, le=1.0)
    step: int | None
    total_steps: int | None
    loss: float | None
    trained_tokens: int
    eta_seconds: float | None
    error: JobError | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    updated_at: datetime


class StageOut(BaseModel):
    position: int
    name: str
    status: str
    corpus_id: int
    eval_corpus_id: int | None
    job_id: int
    steps: int | None
    trained_tokens: int | None
    checkpoint_available: bool
    created_at: datetime
    finished_at: datetime | None


class LineageOut(BaseModel):
    id: int
    name: str
    base_model: str
    architecture: str
    objective: str
    strategy: str
    hyperparameters: dict[str, Any]
    general_corpus_id: int | None
    created_at: datetime
    stages: list[StageOut]


class DomainCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"corpus_id": 1, "name": "news"}]}
    )

    corpus_id: int
    name: str = Field(pattern=DOMAIN_NAME_PATTERN)
    eval_corpus_id: int | None = None


class DomainAccepted(BaseModel):
    stage: StageOut
    job: JobOut


class JobEventOut(BaseModel):
    id: int
    job_id: int
    created_at: datetime
    level: Literal["debug", "info", "warning", "error"]
    type: str
    message: str
    data: dict[str, Any]


class MetricsOut(BaseModel):
    lineage_id: int
    domains: list[str]
    loss_matrix: list[list[float | None]]
    perplexity_matrix: list[list[float | None]]
    base_losses: list[float | None] | None
    forgetting_rate: float | None
    bwt: float | None
    fwt: float | None
    max_forgetting: float | None
    per_domain: list[dict[str, Any]]
    general: dict[str, Any]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
