"""A trained stage's results into the database: its checkpoint, importance snapshots, the
lineage's loss matrix (as rows) and the job's success, in one transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from das_engine.jsonsafe import json_safe
from service_core.lifecycle import add_event, finish_job
from service_core.loss_matrix import cells_from_engine
from service_core.models import JOB_SUCCEEDED, Checkpoint, EvalScore, ImportanceSnapshot, Stage
from service_core.storage import stored_path
from worker.claims import with_db_retry

if TYPE_CHECKING:
    from worker.run_context import RunContext


def record_success(ctx: RunContext, lineage: Any, result: Any) -> None:
    metrics = lineage.metrics()
    artifacts = lineage.artifacts(result.position)
    checkpoint = next(a.path for a in artifacts if a.kind == "checkpoint")
    snapshots = [a for a in artifacts if a.kind != "checkpoint"]

    def record() -> None:
        with ctx.factory() as session, session.begin():
            job = ctx._owned_job(session)
            stage = session.get(Stage, job.stage_id)
            assert stage is not None
            stage.engine_position = result.position
            stage.steps = result.steps
            stage.trained_tokens = result.trained_tokens
            stage.parameters = result.parameters
            stage.growth = json_safe(result.growth) if result.growth else None
            session.add(
                Checkpoint(
                    stage_id=stage.id,
                    path=stored_path(ctx.settings, checkpoint),
                    step=result.steps,
                    final=True,
                )
            )
            for snap in snapshots:
                session.add(
                    ImportanceSnapshot(
                        stage_id=stage.id,
                        kind=snap.kind,
                        path=stored_path(ctx.settings, snap.path),
                        stats=json_safe(snap.stats),
                    )
                )
            _store_eval_scores(session, job.lineage_id, stage, metrics)
            job.progress = 1.0
            job.trained_tokens = result.trained_tokens
            job.step = job.total_steps = result.steps
            finish_job(
                session,
                job,
                JOB_SUCCEEDED,
                message=f"stage {stage.position} ({stage.name}) trained: "
                f"{result.steps} steps, {result.trained_tokens} tokens",
            )
            add_event(
                session,
                job.id,
                "result",
                "stage result",
                data=ctx._clean(_result_data(result, job.lineage_public_id, stage.position)),
            )

    with_db_retry(record, f"job {ctx.claim.job_id}: record the result")


def _result_data(result: Any, lineage_id: str, position: int) -> dict:
    """The engine's stage result as users see it: where to download the stage, not where
    the server keeps it."""
    data = {k: v for k, v in result.to_dict().items() if k not in ("model_dir", "importance_dir")}
    stage_url = f"/v1/lineages/{lineage_id}/stages/{position}"
    data["checkpoint_url"] = f"{stage_url}/checkpoint"
    data["importance_url"] = f"{stage_url}/importance"
    return data


def finished_stage_result(lineage: Any, name: str) -> Any:
    """The engine's result for ``name`` when it is the lineage's last complete stage (the
    engine finished it but the database never heard of it), else None."""
    stages = lineage.stages
    if stages and stages[-1].name == name:
        return lineage.stage_result(stages[-1].position)
    return None


def _store_eval_scores(session: Session, lineage_id: int, stage: Stage, metrics: dict) -> None:
    """Replace the lineage's matrix with the engine's (it back-fills earlier cells)."""
    stage_ids = {
        s.active_name: s.id
        for s in session.scalars(select(Stage).where(Stage.lineage_id == lineage_id))
        if s.active_name is not None and (s.id == stage.id or s.job.status == JOB_SUCCEEDED)
    }
    session.execute(delete(EvalScore).where(EvalScore.lineage_id == lineage_id))
    for cell in cells_from_engine(metrics, stage_ids):
        session.add(
            EvalScore(
                lineage_id=lineage_id,
                stage_id=cell.stage_id,
                domain=cell.domain,
                metric="loss",
                value=cell.value,
            )
        )
