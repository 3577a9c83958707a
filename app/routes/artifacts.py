"""/v1/lineages/{id}/stages/{position}/{checkpoint,importance}: a stage's artifacts as
``.tar`` (GET: streamed, resumable; HEAD: the same headers, no body)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.archives import TarPlan, parse_range
from app.auth import Principal, authenticate, get_session
from app.path_ids import LineagePath
from app.problems import Problem
from app.queries import owned_stage
from service_core.models import JOB_SUCCEEDED, Checkpoint, ImportanceSnapshot, Stage
from service_core.storage import resolve_stored

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])

CHECKPOINT_PATH = "/{lineage_id}/stages/{position}/checkpoint"
IMPORTANCE_PATH = "/{lineage_id}/stages/{position}/importance"


def succeeded_stage(
    lineage_id: LineagePath,
    position: int,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> Stage:
    """The caller's stage at ``position`` (404), once it has succeeded (409 before)."""
    stage = owned_stage(session, lineage_id, position, principal.owner)
    if stage.job.status != JOB_SUCCEEDED:
        raise Problem(
            409,
            "stage_not_ready",
            f"stage {position} is {stage.job.status}; artifacts exist once it has succeeded",
        )
    return stage


def _base_headers(plan: TarPlan, name: str) -> dict[str, str]:
    return {
        "Content-Disposition": f'attachment; filename="{name}.tar"',
        "ETag": plan.etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-cache",
    }


def _tar_response(request: Request, session: Session, plan: TarPlan, name: str) -> Response:
    """The archive, with ETag / If-None-Match and a single byte Range (resumable)."""
    session.close()  # no transaction is held while the archive streams
    etag = plan.etag
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    total = plan.content_length
    headers = _base_headers(plan, name)
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range == etag):
        span = parse_range(wanted, total)
        if span is None:
            raise Problem(
                416,
                "range_not_satisfiable",
                f"the archive has {total} bytes; ask for one range within it",
                headers={"Content-Range": f"bytes */{total}"},
            )
        start, end = span
        headers.update(
            {
                "Content-Length": str(end - start),
                "Content-Range": f"bytes {start}-{end - 1}/{total}",
            }
        )
        return StreamingResponse(
            plan.stream(start, end),
            status_code=206,
            media_type="application/x-tar",
            headers=headers,
        )
    headers["Content-Length"] = str(total)
    return StreamingResponse(plan.stream(), media_type="application/x-tar", headers=headers)


def _head_response(request: Request, session: Session, plan: TarPlan, name: str) -> Response:
    """What GET would answer without a range, minus the body: the size (``Content-Length``
    of the whole archive), ``ETag`` and type, so a client can plan a resumable download."""
    session.close()
    if request.headers.get("if-none-match") == plan.etag:
        return Response(status_code=304, headers={"ETag": plan.etag})
    headers = _base_headers(plan, name)
    headers["Content-Length"] = str(plan.content_length)
    headers["Content-Type"] = "application/x-tar"
    return Response(status_code=200, headers=headers)


def _missing_artifact(what: str) -> Problem:
    return Problem(410, "artifact_missing", f"the {what} files are no longer on the server")


def _tar_route(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "response_class": StreamingResponse,
        "responses": {200: {"content": {"application/x-tar": {}}, "description": "a tar"}},
    }


def checkpoint_plan(request: Request, session: Session, stage: Stage) -> tuple[TarPlan, str]:
    checkpoint = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.stage_id == stage.id, Checkpoint.final.is_(True))
        .order_by(Checkpoint.id.desc())
    )
    root = resolve_stored(request.app.state.settings, checkpoint.path) if checkpoint else None
    if root is None or not root.is_dir():
        raise _missing_artifact("checkpoint")
    top = f"lineage-{stage.lineage_public_id}-stage-{stage.position}-{stage.name}"
    return TarPlan.of_directory(root, top), top


def importance_plan(request: Request, session: Session, stage: Stage) -> tuple[TarPlan, str]:
    snapshots = session.scalars(
        select(ImportanceSnapshot)
        .where(ImportanceSnapshot.stage_id == stage.id)
        .order_by(ImportanceSnapshot.id)
    ).all()
    files: list[Path] = [resolve_stored(request.app.state.settings, s.path) for s in snapshots]
    if not files or not all(f.is_file() for f in files):
        raise _missing_artifact("importance")
    top = f"lineage-{stage.lineage_public_id}-stage-{stage.position}-{stage.name}-importance"
    return TarPlan.of_files(files, top), top


@router.get(CHECKPOINT_PATH, **_tar_route("Download a stage's checkpoint (HF directory) as .tar"))
def download_checkpoint(
    request: Request,
    stage: Stage = Depends(succeeded_stage),
    session: Session = Depends(get_session),
) -> Response:
    """The stage's model after training, a Hugging Face directory, as a .tar; resumable
    (`Range`, `If-Range`) and cacheable (`ETag`, `If-None-Match`). 409 until the stage has
    succeeded."""
    plan, top = checkpoint_plan(request, session, stage)
    return _tar_response(request, session, plan, top)


@router.head(CHECKPOINT_PATH, **_tar_route("A stage checkpoint's size and ETag (no body)"))
def head_checkpoint(
    request: Request,
    stage: Stage = Depends(succeeded_stage),
    session: Session = Depends(get_session),
) -> Response:
    """The headers GET would send (`Content-Length` of the whole archive, `ETag`,
    `Content-Type`) without the body, to plan a resumable download."""
    plan, top = checkpoint_plan(request, session, stage)
    return _head_response(request, session, plan, top)


@router.get(
    IMPORTANCE_PATH,
    **_tar_route("Download a stage's importance snapshots (safetensors) as .tar"),
)
def download_importance(
    request: Request,
    stage: Stage = Depends(succeeded_stage),
    session: Session = Depends(get_session),
) -> Response:
    """The stage's importance snapshots (`general`, `domain`, `accumulated` safetensors) as
    a .tar; resumable and cacheable like the checkpoint."""
    plan, top = importance_plan(request, session, stage)
    return _tar_response(request, session, plan, top)


@router.head(IMPORTANCE_PATH, **_tar_route("The importance archive's size and ETag (no body)"))
def head_importance(
    request: Request,
    stage: Stage = Depends(succeeded_stage),
    session: Session = Depends(get_session),
) -> Response:
    """The headers GET would send for the importance archive, without the body."""
    plan, top = importance_plan(request, session, stage)
    return _head_response(request, session, plan, top)
