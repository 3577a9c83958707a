"""The end-task phase of a stage: after training, the new model (and any row still missing:
the base, earlier stages for a set attached later) is probed on every labelled set attached
to the lineage's domains, with ``das_engine.end_task`` (linear probe, fixed seeds). Cells
are cached by the engine in ``<lineage>/end_task/matrix.json``, so a resumed job or a later
stage computes only what is missing; the scores replace the lineage's ``EndTaskScore`` rows.

A probe that fails does not fail the trained stage: it is a warning event on the job. The
phase is not cancellable: the engine has committed the stage by then, so a cancel here would
leave the engine's lineage and the database disagreeing about it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from service_core.lifecycle import add_event
from service_core.models import JOB_SUCCEEDED, Corpus, EndTaskScore, Stage
from service_core.storage import resolve_stored
from worker.claims import with_db_retry
from worker.progress import END_TASK, SEGMENTS

if TYPE_CHECKING:
    from worker.run_context import RunContext

log = logging.getLogger("das.worker")

MODE = "linear"


def _tasks(ctx: RunContext) -> tuple[dict[str, Path], dict[str, int]]:
    """(domain name -> labelled file, domain name -> stage id) of the lineage's live stages
    (succeeded ones and the one this job trains)."""
    with ctx.factory() as session, session.begin():  # one consistent snapshot of the stages
        job = ctx._owned_job(session)
        tasks: dict[str, Path] = {}
        ids: dict[str, int] = {}
        stages = session.scalars(
            select(Stage).where(Stage.lineage_id == job.lineage_id).order_by(Stage.position)
        ).all()
        for stage in stages:
            live = stage.id == job.stage_id or stage.job.status == JOB_SUCCEEDED
            if not live or stage.active_name is None:
                continue
            ids[stage.name] = stage.id
            if stage.end_task_corpus_id is not None:
                corpus = session.get(Corpus, stage.end_task_corpus_id)
                if corpus is not None and corpus.deleted_at is None:
                    tasks[stage.name] = resolve_stored(ctx.settings, corpus.storage_path)
        return tasks, ids


def _announce(ctx: RunContext, message: str, level: str = "info", **data: Any) -> None:
    def record() -> None:
        with ctx.factory() as session, session.begin():
            ctx._guarded(session, phase=ctx.tracker.phase, progress=ctx.tracker.progress)
            add_event(session, ctx.claim.job_id, "end_task", message, level=level, data=data)

    with_db_retry(record, f"job {ctx.claim.job_id}: end-task progress")


def run_end_task_phase(ctx: RunContext, lineage: Any) -> None:
    """Probe the stages on the attached labelled sets and store the cells (no-op without)."""
    from das_engine.end_task import end_task_matrix
    from das_engine.errors import DasError

    tasks, stage_ids = with_db_retry(lambda: _tasks(ctx), f"job {ctx.claim.job_id}: tasks")
    if not tasks:
        return
    ctx.tracker.enter(END_TASK)
    _, lo, hi = SEGMENTS[END_TASK]
    total = max(1, (len(lineage.stages) + 1) * len(tasks))
    done = [0]
    _announce(ctx, f"end-task evaluation on {len(tasks)} labelled set(s)", tasks=list(tasks))

    def progress(_message: str) -> None:
        done[0] += 1
        ctx.tracker.progress = max(ctx.tracker.progress, lo + (hi - lo) * done[0] / total)

    try:
        result = end_task_matrix(lineage, tasks, progress=progress, mode=MODE)
    except DasError as exc:
        log.warning("job %s: end-task evaluation failed: %s", ctx.claim.job_id, exc.code)
        _announce(
            ctx,
            f"end-task evaluation skipped: {ctx._clean(exc.message)}",
            level="warning",
            code=exc.code,
        )
        return
    except Exception:  # noqa: BLE001 - the trained stage must not be lost to a probe
        log.exception("job %s: end-task evaluation failed", ctx.claim.job_id)
        _announce(
            ctx, "end-task evaluation skipped (an internal error)", level="warning", code="internal"
        )
        return
    _store(ctx, result, stage_ids)


def _store(ctx: RunContext, result: dict, stage_ids: dict[str, int]) -> None:
    """Replace the lineage's end-task rows with the engine's matrices."""
    rows: list[int | None] = [None, *[stage_ids.get(name) for name in result["rows"][1:]]]
    cells = []
    for r, row_id in enumerate(rows):
        if r > 0 and row_id is None:
            continue  # an engine stage the database does not know (not succeeded)
        for c, task in enumerate(result["tasks"]):
            cells.append(
                (row_id, stage_ids[task], result["accuracy"][r][c], result["macro_f1"][r][c])
            )

    def record() -> None:
        with ctx.factory() as session, session.begin():
            job = ctx._owned_job(session)
            session.execute(delete(EndTaskScore).where(EndTaskScore.lineage_id == job.lineage_id))
            for row_id, task_id, acc, f1 in cells:
                if acc is None or f1 is None:
                    continue
                session.add(
                    EndTaskScore(
                        lineage_id=job.lineage_id,
                        stage_id=row_id,
                        task_stage_id=task_id,
                        mode=result["settings"].get("mode", MODE),
                        accuracy=float(acc),
                        macro_f1=float(f1),
                    )
                )
            ctx._guarded(session, phase=ctx.tracker.phase, progress=ctx.tracker.progress)
            add_event(
                session,
                job.id,
                "end_task",
                f"end-task scores: {result['computed']} new cell(s)",
                data={"rows": result["rows"], "tasks": result["tasks"]},
            )

    with_db_retry(record, f"job {ctx.claim.job_id}: record end-task scores")
