"""GET /v1/jobs (filtered list), /v1/jobs/{id}/checkpoints and /v1/jobs/{id}/metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.path_ids import JobPath
from app.presenters import job_out, json_ok
from app.problems import Problem
from app.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    cursor_query,
    owned_job,
    owned_lineage,
    parse_after,
)
from app.schemas import JobOut, Page
from app.schemas_lifecycle import CheckpointList, CheckpointOut, JobMetricsOut, StepMetric
from das_engine.layout import unfinished_stage_checkpoints
from service_core.models import (
    JOB_STATUSES,
    JOB_SUCCEEDED,
    Checkpoint,
    EvalScore,
    Job,
    JobEvent,
    Lineage,
    Stage,
)
from service_core.settings import Settings
from service_core.storage import lineage_dir, resolve_stored

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _statuses(raw: str | None) -> list[str]:
    if raw is None or raw == "":
        return []
    wanted = [s.strip() for s in raw.split(",")]
    bad = [s for s in wanted if s not in JOB_STATUSES]
    if bad:
        message = f"unknown status {bad[0]!r}; one of {', '.join(JOB_STATUSES)} (comma-separated)"
        raise Problem(
            422,
            "validation_error",
            f"status: {message}",
            errors=[{"field": "status", "message": message}],
        )
    return wanted


@router.get(
    "",
    response_model=Page[JobOut],
    summary="List your jobs (filter by status, lineage)",
    description="All your jobs, oldest first, as a cursor page; `status` takes one status "
    "or several comma-separated, `lineage_id` one of your lineages (another owner's: 404).",
)
def list_jobs(
    status: str | None = Query(
        None, max_length=200, description="one status or several, comma-separated"
    ),
    lineage_id: str | None = Query(None, description="only this lineage's jobs (`lin_…`)"),
    after: str | None = cursor_query(),
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="page size"),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    statuses = _statuses(status)
    stmt = (
        select(Job, Stage)
        .join(Stage, Stage.id == Job.stage_id)
        .join(Lineage, Lineage.id == Job.lineage_id)
        .where(Job.owner == principal.owner, Lineage.deleted_at.is_(None))
    )
    if lineage_id is not None:
        stmt = stmt.where(Job.lineage_id == owned_lineage(session, lineage_id, principal.owner).id)
    if statuses:
        stmt = stmt.where(Job.status.in_(statuses))
    start = parse_after(session, Job, after, principal.owner)
    stmt = stmt.where(Job.id > start).order_by(Job.id).limit(limit + 1)
    rows = session.execute(stmt).all()
    has_more = len(rows) > limit
    rows = rows[:limit]
    return json_ok(
        Page[JobOut](
            data=[job_out(job, stage) for job, stage in rows],
            has_more=has_more,
            next_after=rows[-1][0].public_id if has_more and rows else None,
        )
    )


# -- checkpoints ------------------------------------------------------------------------------


def _engine_position(session: Session, stage: Stage) -> int:
    """The stage's position in the engine's lineage: failed and cancelled stages take a
    position in the API's numbering but none on disk."""
    if stage.engine_position is not None:
        return stage.engine_position
    earlier = session.scalar(
        select(func.count(Stage.id))
        .join(Job, Job.stage_id == Stage.id)
        .where(
            Stage.lineage_id == stage.lineage_id,
            Stage.position < stage.position,
            Job.status == JOB_SUCCEEDED,
        )
    )
    return int(earlier or 0) + 1


def step_checkpoints(
    settings: Settings, session: Session, stage: Stage
) -> list[tuple[int, datetime]]:
    """(step, written at) of the step checkpoints the engine keeps for an unfinished stage
    (under ``stages/NNN-<name>.partial/checkpoints``; the last two, removed when the stage
    finishes). Only for the lineage's latest stage of that name: a resubmitted domain reuses
    (resumes) the same folder."""
    latest = session.scalar(
        select(func.max(Stage.position)).where(
            Stage.lineage_id == stage.lineage_id, Stage.name == stage.name
        )
    )
    if latest != stage.position:
        return []
    position = _engine_position(session, stage)
    found = unfinished_stage_checkpoints(
        lineage_dir(settings, stage.lineage_id), position, stage.name
    )
    return [(c.step, datetime.fromtimestamp(c.written_at, UTC)) for c in found]


def list_checkpoints(
    settings: Settings, session: Session, job: Job, stage: Stage
) -> list[CheckpointOut]:
    out: list[CheckpointOut] = []
    if job.status != JOB_SUCCEEDED:
        for step, written in step_checkpoints(settings, session, stage):
            out.append(
                CheckpointOut(
                    step=step,
                    final=False,
                    available=True,
                    downloadable=False,
                    download_url=None,
                    created_at=written,
                )
            )
        return out
    final = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.stage_id == stage.id, Checkpoint.final.is_(True))
        .order_by(Checkpoint.id.desc())
    )
    if final is not None:
        available = resolve_stored(settings, final.path).is_dir()
        out.append(
            CheckpointOut(
                step=final.step or stage.steps or 0,
                final=True,
                available=available,
                downloadable=available,
                download_url=f"/v1/lineages/{stage.lineage_public_id}/stages/"
                f"{stage.position}/checkpoint"
                if available
                else None,
                created_at=final.created_at,
            )
        )
    return out


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="A job's checkpoints: the final one, or the step checkpoints while it trains",
    description="For a succeeded job its final checkpoint with a download URL; while it "
    "trains, the step checkpoints on disk (for resuming: weights and optimizer state, not "
    "downloadable; the older ones are deleted as training goes).",
)
def get_checkpoints(
    job_id: JobPath,
    request: Request,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    job, stage = owned_job(session, job_id, principal.owner)
    data = list_checkpoints(request.app.state.settings, session, job, stage)
    return json_ok(
        CheckpointList(
            job_id=job.public_id,
            lineage_id=job.lineage_public_id,
            stage_position=stage.position,
            data=data,
        )
    )


# -- per-step metrics ---------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def step_series(session: Session, job: Job) -> list[StepMetric]:
    """The training steps the worker reported as events (every ``DAS_EVENT_EVERY_STEPS``
    steps, and the last); a step reported twice (a resumed attempt) keeps its latest."""
    events = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.type.in_(("progress", "phase")))
        .order_by(JobEvent.seq)
    ).all()
    by_step: dict[int, StepMetric] = {}
    for event in events:
        data = event.data or {}
        step = data.get("step")
        if data.get("phase") != "training" or not isinstance(step, int) or step < 1:
            continue
        elapsed = (
            (event.created_at - job.started_at).total_seconds()
            if job.started_at is not None
            else None
        )
        by_step[step] = StepMetric(
            step=step,
            total_steps=data.get("total") if isinstance(data.get("total"), int) else None,
            train_loss=_number(data.get("loss")),
            tokens_per_s=_number(data.get("tokens_per_s")),
            trained_tokens=data.get("trained_tokens")
            if isinstance(data.get("trained_tokens"), int)
            else None,
            learning_rate=_number(data.get("lr")),
            elapsed_s=None if elapsed is None else max(0.0, elapsed),
        )
    return [by_step[s] for s in sorted(by_step)]


@router.get(
    "/{job_id}/metrics",
    response_model=JobMetricsOut,
    summary="A job's training curve (per-step loss, tokens/s) and its held-out losses",
    description="`series`: step, train loss, tokens/s, trained tokens and elapsed time from "
    "the stored progress events; `eval_loss` / `eval_losses` / `general_loss`: the stage's "
    "held-out losses once it has succeeded.",
)
def get_job_metrics(
    job_id: JobPath,
    request: Request,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    job, stage = owned_job(session, job_id, principal.owner)
    scores = session.scalars(
        select(EvalScore).where(EvalScore.stage_id == stage.id, EvalScore.metric == "loss")
    ).all()
    losses = {s.domain: s.value for s in scores}
    eval_losses = {d: v for d, v in losses.items() if d is not None}
    return json_ok(
        JobMetricsOut(
            job_id=job.public_id,
            lineage_id=job.lineage_public_id,
            stage_position=stage.position,
            domain=stage.name,
            status=job.status,
            every_steps=request.app.state.settings.event_every_steps,
            series=step_series(session, job),
            eval_loss=eval_losses.get(stage.name),
            eval_losses=eval_losses,
            general_loss=losses.get(None),
        )
    )
