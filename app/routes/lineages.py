"""/v1/lineages: create, list and read lineages (domains: domains.py; metrics: metrics.py;
artifacts: artifacts.py; fork: fork.py; deletion: deletes.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, get_session
from app.idempotency import IdempotencyScope, idempotency_header, request_hash
from app.lineage_building import (
    build_lineage,
    check_storable_hyperparameters,
)
from app.path_ids import LineagePath
from app.presenters import json_ok, lineage_out
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, cursor_query, owned_lineage, paginate
from app.ratelimit import write_access
from app.schemas import (
    LineageCreate,
    LineageOut,
    Page,
)
from app.storable import encode_json
from service_core.models import (
    Lineage,
)

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])
LIMIT = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="items per page")


@router.post(
    "",
    status_code=201,
    response_model=LineageOut,
    summary="Create a lineage",
    dependencies=[Depends(idempotency_header)],
)
def create_lineage(
    body: LineageCreate, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    """Create a lineage: a base model, a strategy and hyper-parameters, to which domains are then
    added in order. Everything is checked before anything is stored: the base model loads, each
    hyper-parameter is in range and storable, `block_size` fits the base's positions, the mixed
    precision suits the workers' device (`DAS_WORKER_DEVICE`), and with `max_steps` the job
    token quota (`DAS_MAX_JOB_TOKENS`, 422). Honours `Idempotency-Key`.
    """
    settings = request.app.state.settings
    factory = request.app.state.session_factory
    scope = IdempotencyScope.from_request(request, principal.owner)

    check_storable_hyperparameters(body.hyperparameters)  # before it is hashed

    def produce() -> dict:
        with factory() as session, session.begin():
            lineage = build_lineage(
                settings,
                session,
                principal.owner,
                body,
                reads=request.app.state.read_session_factory,
            )
            answer = lineage_out(lineage).model_dump(mode="json")
            encode_json(answer)  # the answer can be sent: only then is the row committed
            return answer

    return scope.run(request_hash(scope.endpoint, body.model_dump(mode="json")), 201, produce)


@router.get("", response_model=Page[LineageOut], summary="List your lineages")
def list_lineages(
    after: str | None = cursor_query(),
    limit: int = LIMIT,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """Your lineages, oldest first, each with its ordered stages."""
    stmt = select(Lineage).where(Lineage.owner == principal.owner, Lineage.deleted_at.is_(None))
    rows, has_more, cursor = paginate(session, stmt, Lineage, after, limit, principal.owner)
    return json_ok(
        Page[LineageOut](data=[lineage_out(r) for r in rows], has_more=has_more, next_after=cursor)
    )


@router.get("/{lineage_id}", response_model=LineageOut, summary="A lineage and its stages")
def get_lineage(
    lineage_id: LineagePath,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """One of your lineages and its stages."""
    return json_ok(lineage_out(owned_lineage(session, lineage_id, principal.owner)))


# -- domains ------------------------------------------------------------------------------
