"""POST /v1/lineages/{id}/fork: a new lineage of the same owner whose stages 1..k are
copies of the parent's succeeded stages up to ``from_stage`` (files and rows), so that new
domains can be added to the branch while the parent stays as it is.

Order, so that no half-made fork is ever visible: read what to copy; copy the files with
the engine's ``Lineage.fork`` into a hidden folder; then, in one transaction, create the
rows and rename the folder into place (a failure removes the folder)."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.idempotency import IdempotencyScope, request_hash
from app.path_ids import LineagePath
from app.presenters import lineage_out
from app.problems import Problem
from app.queries import owned_lineage
from app.ratelimit import write_access
from app.schemas import LineageOut
from app.schemas_lifecycle import ForkCreate, problem_responses
from service_core.lifecycle import add_event
from service_core.models import (
    JOB_SUCCEEDED,
    Checkpoint,
    EvalScore,
    ImportanceSnapshot,
    Job,
    JobEvent,
    Lineage,
    Stage,
)
from service_core.settings import Settings
from service_core.storage import lineage_dir, resolve_stored, stored_path

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])

_LINEAGE_COPIED = ("base_model", "architecture", "objective", "strategy", "hyperparameters")
_JOB_COPIED = ("progress", "step", "total_steps", "trained_tokens", "loss", "started_at")
_JOB_COPIED += ("finished_at", "attempts")


@dataclass
class _Plan:
    parent_id: int
    parent_public_id: str  # what messages and events name
    position: int  # the parent's stage branched after (API numbering)
    upto: int  # how many engine stages are copied
    stage_ids: list[int] = field(default_factory=list)


def _pick_stage(parent: Lineage, body: ForkCreate) -> Stage:
    name = body.stage_name()
    for stage in parent.stages:
        if (name is not None and stage.name == name and stage.job.status == JOB_SUCCEEDED) or (
            name is None and stage.position == int(body.from_stage)
        ):
            return stage
    raise Problem(
        404,
        "stage_not_found",
        f"lineage {parent.public_id} has no succeeded stage {body.from_stage!r}",
        errors=[{"field": "from_stage", "message": "no such stage"}],
    )


def plan_fork(session: Session, owner: str, lineage_id: str, body: ForkCreate) -> _Plan:
    parent = owned_lineage(session, lineage_id, owner)
    stage = _pick_stage(parent, body)
    if stage.job.status != JOB_SUCCEEDED:
        raise Problem(
            409,
            "stage_not_ready",
            f"stage {stage.position} is {stage.job.status}; a fork starts from a succeeded stage",
        )
    if body.from_checkpoint is not None and body.from_checkpoint != stage.steps:
        raise Problem(
            422,
            "checkpoint_not_supported",
            f"stage {stage.position} keeps only its final checkpoint (step {stage.steps}); "
            "the engine deletes step checkpoints when a stage finishes. Leave from_checkpoint "
            "out, or pass the final step",
            errors=[{"field": "from_checkpoint", "message": "only the final step is kept"}],
        )
    copied = [
        s for s in parent.stages if s.position <= stage.position and s.job.status == JOB_SUCCEEDED
    ]
    upto = stage.engine_position or len(copied)
    if upto != len(copied):
        raise Problem(
            409, "lineage_inconsistent", f"lineage {lineage_id}'s stages disagree with its files"
        )
    return _Plan(parent.id, parent.public_id, stage.position, upto, [s.id for s in copied])


def copy_files(settings: Settings, plan: _Plan, names: list[str]) -> Path:
    """The engine's fork into a hidden folder under ``lineages/``; returns it."""
    from das_engine.errors import DasError
    from das_engine.lineage import Lineage as EngineLineage

    hidden = settings.lineages_dir / f".fork-{secrets.token_hex(8)}"
    try:
        engine = EngineLineage.open(lineage_dir(settings, plan.parent_id))
        engine.fork(hidden, plan.upto)
        forked = [s.name for s in EngineLineage.open(hidden).stages]
    except (DasError, FileNotFoundError) as exc:  # gone (deleted meanwhile, or lost)
        shutil.rmtree(hidden, ignore_errors=True)
        raise Problem(
            410, "artifact_missing", f"lineage {plan.parent_public_id}'s files cannot be forked"
        ) from exc
    except BaseException:
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    if forked != names:
        shutil.rmtree(hidden, ignore_errors=True)
        raise Problem(
            409,
            "lineage_inconsistent",
            f"lineage {plan.parent_public_id}'s stages disagree with its files",
        )
    return hidden


class _Paths:
    """Stored paths of the parent's files -> the same files in the fork."""

    def __init__(self, settings: Settings, parent: Path, child: Path) -> None:
        self.settings, self.parent, self.child = settings, parent.resolve(), child

    def __call__(self, value: str) -> str | None:
        try:
            rel = resolve_stored(self.settings, value).resolve().relative_to(self.parent)
        except ValueError:
            return None
        return stored_path(self.settings, self.child / rel)


def _copy_rows(session: Session, plan: _Plan, child: Lineage, paths: _Paths) -> None:
    stage_map: dict[int, int] = {}
    for number, parent_stage_id in enumerate(plan.stage_ids, start=1):
        old = session.get(Stage, parent_stage_id)
        assert old is not None
        new = Stage(
            lineage_id=child.id,
            position=number,
            name=old.name,
            active_name=old.name,
            corpus_id=old.corpus_id,
            eval_corpus_id=old.eval_corpus_id,
            end_task_corpus_id=old.end_task_corpus_id,
            engine_position=number,
            steps=old.steps,
            trained_tokens=old.trained_tokens,
            parameters=old.parameters,
            growth=old.growth,
            finished_at=old.finished_at,
        )
        session.add(new)
        session.flush()
        stage_map[old.id] = new.id
        old_job = old.job
        job = Job(
            stage_id=new.id,
            lineage_id=child.id,
            owner=child.owner,
            status=JOB_SUCCEEDED,
            **{k: getattr(old_job, k) for k in _JOB_COPIED},
        )
        session.add(job)
        session.flush()
        for event in session.scalars(
            select(JobEvent).where(JobEvent.job_id == old_job.id).order_by(JobEvent.seq)
        ):
            job.last_event_seq = event.seq  # the copy keeps the numbers: add_event goes on
            session.add(
                JobEvent(
                    job_id=job.id,
                    seq=event.seq,
                    created_at=event.created_at,
                    level=event.level,
                    type=event.type,
                    message=event.message,
                    data=event.data,
                )
            )
        session.flush()
        add_event(
            session,
            job.id,
            "forked",
            f"copied from job {old_job.public_id} (lineage {plan.parent_public_id}, "
            f"stage {old.position})",
            data={"from_lineage_id": plan.parent_public_id, "from_job_id": old_job.public_id},
        )
        for cp in session.scalars(select(Checkpoint).where(Checkpoint.stage_id == old.id)):
            path = paths(cp.path)
            if path is not None:
                session.add(Checkpoint(stage_id=new.id, path=path, step=cp.step, final=cp.final))
        for snap in session.scalars(
            select(ImportanceSnapshot).where(ImportanceSnapshot.stage_id == old.id)
        ):
            path = paths(snap.path)
            if path is not None:
                session.add(
                    ImportanceSnapshot(stage_id=new.id, kind=snap.kind, path=path, stats=snap.stats)
                )
    names = {session.get(Stage, i).name for i in plan.stage_ids}  # type: ignore[union-attr]
    for score in session.scalars(select(EvalScore).where(EvalScore.lineage_id == plan.parent_id)):
        in_rows = score.stage_id is None or score.stage_id in stage_map
        in_columns = score.domain is None or score.domain in names
        if in_rows and in_columns:
            session.add(
                EvalScore(
                    lineage_id=child.id,
                    stage_id=None if score.stage_id is None else stage_map[score.stage_id],
                    domain=score.domain,
                    metric=score.metric,
                    value=score.value,
                )
            )


def create_fork(
    settings: Settings,
    factory: Any,
    read_factory: Any,
    owner: str,
    lineage_id: str,
    body: ForkCreate,
) -> dict[str, Any]:
    with read_factory() as session:
        plan = plan_fork(session, owner, lineage_id, body)
        names = [session.get(Stage, i).name for i in plan.stage_ids]  # type: ignore[union-attr]
    hidden = copy_files(settings, plan, names)
    target: Path | None = None
    try:
        with factory() as session, session.begin():
            parent = owned_lineage(session, lineage_id, owner)  # not deleted meanwhile
            child = Lineage(
                owner=owner,
                name=body.name,
                general_corpus_id=parent.general_corpus_id,
                forked_from_id=parent.id,
                forked_from_position=plan.position,
                **{k: getattr(parent, k) for k in _LINEAGE_COPIED},
            )
            session.add(child)
            session.flush()
            target = lineage_dir(settings, child.id)
            if target.exists():
                target = None
                raise Problem(409, "conflict", "the new lineage's folder exists; retry")
            os.replace(hidden, target)
            _copy_rows(
                session, plan, child, _Paths(settings, lineage_dir(settings, parent.id), target)
            )
            session.flush()
            session.refresh(child)
            return lineage_out(child).model_dump(mode="json")
    except BaseException:
        shutil.rmtree(target or hidden, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


@router.post(
    "/{lineage_id}/fork",
    status_code=201,
    response_model=LineageOut,
    responses=problem_responses(410),
    summary="Fork a lineage after one of its stages (a new lineage; add domains to it)",
    description="A new lineage of yours with the parent's base, strategy and "
    "hyper-parameters, whose stages 1..k are copies of the parent's succeeded stages up to "
    "`from_stage` (files and records). `from_checkpoint` other than the stage's final step "
    "is a 422 `checkpoint_not_supported`.",
)
def fork_lineage(
    lineage_id: LineagePath,
    body: ForkCreate,
    request: Request,
    principal: Principal = Depends(write_access),
) -> JSONResponse:
    state = request.app.state
    scope = IdempotencyScope.from_request(request, principal.owner)

    def produce() -> dict[str, Any]:
        return create_fork(
            state.settings,
            state.session_factory,
            state.read_session_factory,
            principal.owner,
            lineage_id,
            body,
        )

    return scope.run(request_hash(scope.endpoint, body.model_dump(mode="json")), 201, produce)
