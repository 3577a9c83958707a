"""/v1/api-keys: list, create, revoke and rotate the caller's own API keys. The secret is
shown once, in the answer that creates it; only its SHA-256 is stored. These POSTs ignore
``Idempotency-Key``: replaying one would need the secret stored."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate, create_api_key, get_session, hash_key
from app.path_ids import KeyPath
from app.presenters import json_ok
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, cursor_query, owned, paginate, shown
from app.ratelimit import write_access
from app.schemas import Page
from app.schemas_lifecycle import ApiKeyCreated, ApiKeyOut, problem_responses
from service_core.models import ApiKey, utcnow

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])


def key_out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        id=row.public_id, prefix=row.prefix, created_at=row.created_at, revoked_at=row.revoked_at
    )


def _new_key(session: Session, owner: str) -> dict:
    key = create_api_key(session, owner)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    assert row is not None
    return ApiKeyCreated(**key_out(row).model_dump(), key=key).model_dump(mode="json")


@router.get(
    "",
    response_model=Page[ApiKeyOut],
    summary="List your API keys (never the secret)",
    description="Your owner's keys, oldest first: id, prefix, created_at, revoked_at.",
)
def list_keys(
    after: str | None = cursor_query(),
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="page size"),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    stmt = select(ApiKey).where(ApiKey.owner == principal.owner)
    rows, has_more, cursor = paginate(session, stmt, ApiKey, after, limit, principal.owner)
    return json_ok(
        Page[ApiKeyOut](data=[key_out(r) for r in rows], has_more=has_more, next_after=cursor)
    )


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Create another API key for your owner (the secret is shown once)",
    description="201 with the new key's secret, shown only in this answer (it is stored "
    "hashed). Not idempotent: a replay would need the secret stored.",
)
def create_key(request: Request, principal: Principal = Depends(write_access)) -> JSONResponse:
    with request.app.state.session_factory() as session, session.begin():
        return JSONResponse(_new_key(session, principal.owner), status_code=201)


@router.delete(
    "/{key_id}",
    status_code=204,
    responses=problem_responses(429),
    summary="Revoke an API key (it answers 401 then)",
    description="Sets `revoked_at` (204); every request with that key is then a 401 "
    "(conditional reads in other API processes within `DAS_AUTH_CACHE_SECONDS`).",
)
def revoke_key(
    key_id: KeyPath, request: Request, principal: Principal = Depends(write_access)
) -> Response:
    with request.app.state.session_factory() as session, session.begin():
        row = owned(session, ApiKey, key_id, principal.owner, "api_key")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    request.app.state.key_cache.clear()  # this process's conditional reads re-verify keys
    return Response(status_code=204)


@router.post(
    "/{key_id}/rotate",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Rotate an API key: a new key (shown once) replaces it, the old one is revoked",
    description="201 with a new key for the same owner, shown once; the old key is revoked "
    "in the same transaction (409 `api_key_revoked` if it already was).",
)
def rotate_key(
    key_id: KeyPath, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    with request.app.state.session_factory() as session, session.begin():
        row = owned(session, ApiKey, key_id, principal.owner, "api_key")
        session.refresh(row, with_for_update=True)  # two rotations race: one wins
        if row.revoked_at is not None:
            raise Problem(409, "api_key_revoked", f"API key {shown(key_id)} is already revoked")
        row.revoked_at = utcnow()
        body = _new_key(session, principal.owner)
    request.app.state.key_cache.clear()  # this process's conditional reads re-verify keys
    return JSONResponse(body, status_code=201)
