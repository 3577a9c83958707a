"""API keys: high-entropy bearer tokens, stored only as a SHA-256 hash, compared in constant
time. Every resource belongs to the key's ``owner``."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.problems import Problem
from app.storable import text_problem
from service_core.models import ApiKey

KEY_PREFIX = "das_"
_LOOKUP_CHARS = 12  # the first characters of a key, stored in clear to find its row


@dataclass(frozen=True)
class Principal:
    owner: str
    key_id: int


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, owner: str) -> str:
    """Store a new key for ``owner`` and return it; it cannot be read back later."""
    owner = owner.strip()
    if not owner or len(owner) > 100:
        raise ValueError("owner must be 1 to 100 characters")
    why = text_problem(owner)  # e.g. a surrogate from a command line that is not UTF-8
    if why:
        raise ValueError(f"owner {why}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(owner=owner, prefix=key[:_LOOKUP_CHARS], key_hash=hash_key(key)))
    session.flush()
    return key


def verify_api_key(session: Session, key: str) -> ApiKey | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == key[:_LOOKUP_CHARS], ApiKey.revoked_at.is_(None))
    ).all()
    found = None
    for candidate in candidates:
        if hmac.compare_digest(candidate.key_hash, digest):
            found = candidate
    return found


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def get_session(request: Request):  # noqa: ANN201 - a FastAPI generator dependency
    """A read-only session for the request (the GET routes); writes open their own.

    ``async`` on purpose: a sync generator dependency is closed in the thread pool, and under
    load every pool thread can be waiting for a database connection while the connections
    wait for a thread to close their sessions -- a deadlock (found by
    benchmarks/load_status.py). Closing here, on the event loop, only returns the connection
    to the pool (a rollback of a read)."""
    session: Session = request.app.state.read_session_factory()
    try:
        yield session
    finally:
        session.close()


def authenticate(request: Request) -> Principal:
    """The caller's identity from ``Authorization: Bearer <key>`` (401 otherwise). Uses a
    session of its own, closed at once, so that no lock is held for the whole request."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise _unauthorized("missing Authorization header (expected 'Bearer <api key>')")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <api key>'")
    with request.app.state.read_session_factory() as session:
        api_key = verify_api_key(session, token.strip())
        if api_key is None:
            raise _unauthorized("invalid API key")
        principal = Principal(owner=api_key.owner, key_id=api_key.id)
    request.state.principal = principal
    request.app.state.key_cache.put(token.strip(), principal)  # for conditional reads
    return principal
