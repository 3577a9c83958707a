"""GET /v1/lineages/{id}/importance: the stored importance snapshots summarised per layer
and unit kind (mean, share of units above 0.5), stage by stage: what the dashboard's
importance view draws, without downloading the .tar of safetensors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.path_ids import LineagePath
from app.presenters import json_ok
from app.queries import owned_lineage
from service_core.models import JOB_SUCCEEDED, ImportanceSnapshot
from service_core.storage import resolve_stored

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])


class UnitKindSummary(BaseModel):
    layers: int = Field(description="rows of the snapshot (transformer layers)")
    units: int = Field(description="units per layer of this kind")
    mean: list[float] = Field(description="per layer: the mean importance, in [0, 1)")
    share_above_half: list[float] = Field(
        description="per layer: the share of units whose importance exceeds 0.5"
    )


class StageImportance(BaseModel):
    position: int = Field(description="the stage's position, from 1")
    name: str = Field(description="its domain")
    snapshots: dict[str, dict[str, UnitKindSummary]] = Field(
        description="by snapshot (`general`, `domain`, `accumulated`), by unit kind "
        "(`head`, `intermediate`, `output`, and extra kinds a stage measured)"
    )


class ImportanceSummaryOut(BaseModel):
    lineage_id: str = Field(description="the lineage (`lin_…`)")
    stages: list[StageImportance] = Field(
        description="the succeeded stages that stored snapshots, in order (strategies "
        "without importance store none)"
    )


@lru_cache(maxsize=256)
def _summary(path: str, _mtime_ns: int, _size: int) -> dict[str, dict]:
    """Cached per file version (path, mtime, size): a dashboard re-reads this often."""
    from das_engine.importance import layer_summary

    return layer_summary(Path(path))


def snapshot_summary(path: Path) -> dict[str, dict] | None:
    """The summary of one snapshot file; None when it is gone or unreadable."""
    try:
        stat = path.stat()
        return _summary(str(path), stat.st_mtime_ns, stat.st_size)
    except Exception:  # noqa: BLE001 - a damaged file must not fail the whole answer
        return None


@router.get(
    "/{lineage_id}/importance",
    response_model=ImportanceSummaryOut,
    summary="Accumulated unit importance per layer and unit kind, stage by stage",
)
def get_importance_summary(
    lineage_id: LineagePath,
    request: Request,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """Per succeeded stage, each stored importance snapshot summarised per layer and unit
    kind: the mean importance and the share of units above 0.5 (what the soft mask mostly
    protects). The `accumulated` snapshots show how protection grew stage by stage."""
    lineage = owned_lineage(session, lineage_id, principal.owner)
    settings = request.app.state.settings
    stages = [s for s in lineage.stages if s.job.status == JOB_SUCCEEDED]
    rows = session.scalars(
        select(ImportanceSnapshot)
        .where(ImportanceSnapshot.stage_id.in_([s.id for s in stages]))
        .order_by(ImportanceSnapshot.id)
    ).all()
    out = []
    for stage in stages:
        snapshots: dict[str, dict] = {}
        for row in rows:
            if row.stage_id != stage.id:
                continue
            summary = snapshot_summary(resolve_stored(settings, row.path))
            if summary:
                snapshots[row.kind] = summary
        if snapshots:
            out.append(
                StageImportance(position=stage.position, name=stage.name, snapshots=snapshots)
            )
    return json_ok(ImportanceSummaryOut(lineage_id=lineage.public_id, stages=out))
