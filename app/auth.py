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
from app.ui.sessions import COOKIE, CSRF_HEADER, close_session, csrf_ok, read_session
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


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _from_cookie(request: Request, token: str) -> Principal:
    """The dashboard's session cookie (app/ui/sessions.py): the key it stands for must still
    be valid, and a write must carry the session's CSRF token in a header (which a form or
    a link from another site cannot send)."""
    data_dir = request.app.state.settings.data_dir
    browser = read_session(data_dir, token)
    if browser is None:
        raise _unauthorized("the session has expired or was closed; log in again")
    with request.app.state.read_session_factory() as session:
        api_key = session.get(ApiKey, browser.key_id)
        if api_key is None or api_key.revoked_at is not None or api_key.owner != browser.owner:
            close_session(data_dir, token)
            raise _unauthorized("the session's API key was revoked; log in again")
    if request.method not in SAFE_METHODS and not csrf_ok(
        browser, request.headers.get(CSRF_HEADER)
    ):
        raise Problem(
            403,
            "csrf_failed",
            f"a write with the session cookie needs the {CSRF_HEADER} header of the session",
        )
    principal = Principal(owner=browser.owner, key_id=browser.key_id)
    request.state.principal = principal
    return principal


def authenticate(request: Request) -> Principal:
    """The caller's identity from ``Authorization: Bearer <key>``, or else from the
    dashboard's session cookie (401 otherwise). Uses a session of its own, closed at once,
    so that no lock is held for the whole request."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        cookie = request.cookies.get(COOKIE)
        if cookie:
            return _from_cookie(request, cookie)
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
