"""/v1/lineages/{id}/metrics: the loss matrix and the forgetting metrics derived from it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.path_ids import LineagePath
from app.presenters import json_ok
from app.queries import owned_lineage
from app.schemas import (
    MetricsOut,
)
from das_engine.jsonsafe import finite, json_safe
from service_core.loss_matrix import LossCell, matrix_from_cells
from service_core.models import (
    JOB_SUCCEEDED,
    EndTaskScore,
    EvalScore,
    Lineage,
    Stage,
)

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])


def build_metrics(session: Session, lineage: Lineage) -> dict[str, Any]:
    """The matrix from stored ``EvalScore`` rows, summarised by ``das_engine.metrics``."""
    from das_engine.metrics import summarize

    stages = [s for s in lineage.stages if s.job.status == JOB_SUCCEEDED]
    scores = session.scalars(
        select(EvalScore).where(EvalScore.lineage_id == lineage.id, EvalScore.metric == "loss")
    ).all()
    m = matrix_from_cells(
        (LossCell(s.stage_id, s.domain, s.value) for s in scores),
        [(st.id, st.name) for st in stages],
    )
    summary = summarize(m.domains, m.loss_matrix, m.base_losses, m.general)
    summary["end_task"] = end_task_block(session, lineage, stages)
    summary["growth"] = [
        {"position": st.position, "name": st.name, "parameters": st.parameters, "growth": st.growth}
        for st in stages
    ]
    return json_safe(summary)


def end_task_block(session: Session, lineage: Lineage, stages: list[Stage]) -> dict | None:
    """Accuracy and macro-F1 matrices from ``EndTaskScore`` rows (rows: the base, then each
    trained stage; columns: the domains with a labelled set), with FR/BWT/FWT computed as
    ``das_engine.end_task`` does (on the negated scores)."""
    from das_engine.end_task import summarize_scores

    scores = session.scalars(
        select(EndTaskScore).where(EndTaskScore.lineage_id == lineage.id)
    ).all()
    if not scores:
        return None
    probed = {s.task_stage_id for s in scores}
    tasks = [st for st in stages if st.id in probed]
    cell = {(s.stage_id, s.task_stage_id): s for s in scores}
    rows: list[int | None] = [None, *[st.id for st in stages]]

    def matrix(attr: str) -> list[list[float | None]]:
        return [
            [finite(getattr(cell[(r, t.id)], attr)) if (r, t.id) in cell else None for t in tasks]
            for r in rows
        ]

    domains, names = [st.name for st in stages], [t.name for t in tasks]
    acc, f1 = matrix("accuracy"), matrix("macro_f1")
    return {
        "rows": ["base", *domains],
        "tasks": names,
        "mode": scores[0].mode,
        "accuracy": acc,
        "macro_f1": f1,
        "summary": {
            "accuracy": summarize_scores(domains, names, acc[0], acc[1:]),
            "macro_f1": summarize_scores(domains, names, f1[0], f1[1:]),
        },
    }


@router.get("/{lineage_id}/metrics", response_model=MetricsOut, summary="Forgetting metrics")
def get_metrics(
    lineage_id: LineagePath,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """The lineage's evaluation matrix (loss and perplexity of the model after each stage on every
    domain) and its forgetting summary (forgetting rate, BWT, FWT); non-finite values are null.
    `end_task`: accuracy and macro-F1 of a probe on each labelled set attached to a domain,
    after the base and every stage, with the same summary on those scores. `growth`: per
    stage, the checkpoint's parameter count and what the strategy grew (ELLE's wider and
    deeper model, CPT's plugin neurons and masks per domain).
    """
    lineage = owned_lineage(session, lineage_id, principal.owner)
    return json_ok(MetricsOut(lineage_id=lineage.public_id, **build_metrics(session, lineage)))
