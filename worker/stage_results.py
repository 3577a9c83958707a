"""A trained stage's results into the database: its checkpoint, importance snapshots, the
lineage's loss matrix (as rows) and the job's success, in one transaction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service_core.lifecycle import add_event, finish_job
from service_core.models import JOB_SUCCEEDED, Checkpoint, EvalScore, ImportanceSnapshot, Stage
from service_core.storage import stored_path
from worker.claims import with_db_retry

if TYPE_CHECKING:
    from worker.run_context import RunContext


def record_success(ctx: RunContext, lineage: Any, result: Any) -> None:
    metrics = lineage.metrics()
    snapshots = _importance_files(lineage, result)

    def record() -> None:
        with ctx.factory() as session, session.begin():
            job = ctx._owned_job(session)
            stage = session.get(Stage, job.stage_id)
            assert stage is not None
            stage.engine_position = result.position
            stage.steps = result.steps
            stage.trained_tokens = result.trained_tokens
            session.add(
                Checkpoint(
                    stage_id=stage.id,
                    path=stored_path(ctx.settings, Path(result.model_dir)),
                    step=result.steps,
                    final=True,
                )
            )
            for kind, path, stats in snapshots:
                session.add(
                    ImportanceSnapshot(
                        stage_id=stage.id,
                        kind=kind,
                        path=stored_path(ctx.settings, path),
                        stats=stats,
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
    from das_engine.lineage import StageResult

    for info in lineage.stages:
        if info.name == name and info is lineage.stages[-1]:
            meta = info.meta
            return StageResult(
                position=info.position,
                name=info.name,
                model_dir=info.model_dir,
                importance_dir=info.importance_dir,
                steps=int(meta.get("steps") or 0),
                trained_tokens=int(meta.get("trained_tokens") or 0),
                eval_losses=meta.get("eval") or {},
                general_loss=meta.get("general_loss"),
            )
    return None


def _importance_files(lineage: Any, result: Any) -> list[tuple[str, Path, dict]]:
    """(kind, path, stats) of the snapshots that belong with this stage: its own domain and
    accumulated importance, and the lineage's general importance they build on."""
    out = []
    general = Path(lineage.path) / "importance" / "general.safetensors"
    if general.is_file():
        out.append(("general", general, {}))
    stats = {}
    for info in lineage.stages:
        if info.position == result.position:
            stats = info.meta.get("importance") or {}
    for path in sorted(Path(result.importance_dir).glob("*.safetensors")):
        kind = path.stem if path.stem in ("domain", "accumulated", "general") else "domain"
        out.append((kind, path, json_safe(stats.get(kind, {}))))
    return out


def _store_eval_scores(session: Session, lineage_id: int, stage: Stage, metrics: dict) -> None:
    """Replace the lineage's matrix with the engine's (it back-fills earlier cells)."""
    domains: list[str] = metrics.get("domains") or []
    stage_ids = {
        s.active_name: s.id
        for s in session.scalars(select(Stage).where(Stage.lineage_id == lineage_id))
        if s.active_name is not None and (s.id == stage.id or s.job.status == JOB_SUCCEEDED)
    }
    session.execute(delete(EvalScore).where(EvalScore.lineage_id == lineage_id))

    def add(stage_id: int | None, domain: str | None, value: Any) -> None:
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            session.add(
                EvalScore(
                    lineage_id=lineage_id,
                    stage_id=stage_id,
                    domain=domain,
                    metric="loss",
                    value=float(value),
                )
            )

    for row_name, row in zip(domains, metrics.get("loss_matrix") or [], strict=False):
        if row_name in stage_ids:
            for domain, value in zip(domains, row, strict=False):
                add(stage_ids[row_name], domain, value)
    for domain, value in zip(domains, metrics.get("base_losses") or [], strict=False):
        add(None, domain, value)
    general = metrics.get("general") or {}
    if general:
        add(None, None, general.get("base_loss"))
        for row_name, value in zip(domains, general.get("losses") or [], strict=False):
            if row_name in stage_ids:
                add(stage_ids[row_name], None, value)


def json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
