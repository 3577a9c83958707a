"""``Idempotency-Key`` on POST: the same key with the same request gives the same response
(replayed from the database); the same key with another request is a 409.

A request's identity is a hash of its endpoint and its *meaning* (the parsed JSON body, or for
an upload the form fields and the file's SHA-256), so a client that retries with a new
multipart boundary is still recognised. Only successful (2xx) results are stored: a request
that failed validation can be corrected and retried with the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.problems import Problem
from service_core.models import IdempotencyRecord, utcnow

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


def idempotency_header(
    key: str | None = Header(
        None,
        alias=HEADER,
        description="1 to 255 printable characters: the same key with the same request "
        "replays the first successful answer (header `Idempotent-Replayed: true`); with "
        "another request it is a 409 `idempotency_key_reused`; while the first is still "
        "being processed, a 409 `idempotency_in_progress` with `Retry-After`. Remembered "
        "per owner for `DAS_IDEMPOTENCY_TTL_SECONDS`.",
    ),
) -> None:
    """Declares the header on the routes that honour it (``dependencies=[...]``), for the
    OpenAPI document; ``IdempotencyScope.from_request`` reads and checks it (a malformed key
    is a 400 ``invalid_idempotency_key``, not a 422)."""


def request_hash(endpoint: str, meaning: Any) -> str:
    canonical = json.dumps(meaning, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{endpoint}\n{canonical}".encode()).hexdigest()


@dataclass
class IdempotencyScope:
    """The idempotency state of one request (``key`` is None when the header is absent)."""

    factory: sessionmaker[Session]
    owner: str
    key: str | None
    endpoint: str
    ttl_seconds: int
    record_id: int | None = None

    @classmethod
    def from_request(cls, request: Request, owner: str) -> IdempotencyScope:
        key = request.headers.get(HEADER)
        if key is not None:
            key = key.strip()
            if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
                raise Problem(
                    400,
                    "invalid_idempotency_key",
                    f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable characters",
                )
        settings = request.app.state.settings
        return cls(
            factory=request.app.state.session_factory,
            owner=owner,
            key=key,
            endpoint=f"{request.method} {request.url.path}",
            ttl_seconds=settings.idempotency_ttl_seconds,
        )

    def existing(self) -> IdempotencyRecord | None:
        """The stored record for this key, if any (expired records are dropped first)."""
        if self.key is None:
            return None
        with self.factory() as session, session.begin():
            cutoff = utcnow() - timedelta(seconds=self.ttl_seconds)
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.owner == self.owner, IdempotencyRecord.created_at < cutoff
                )
            )
            record = session.scalar(
                select(IdempotencyRecord).where(
                    IdempotencyRecord.owner == self.owner, IdempotencyRecord.key == self.key
                )
            )
            if record is not None:
                session.expunge(record)
            return record

    def replay(self, record: IdempotencyRecord, req_hash: str) -> JSONResponse:
        if record.status_code is None:
            raise Problem(
                409,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
                headers={"Retry-After": "1"},
            )
        if record.request_hash != req_hash:
            raise Problem(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request",
            )
        return JSONResponse(
            record.response_body,
            status_code=record.status_code,
            headers={"Idempotent-Replayed": "true"},
        )

    def reserve(self) -> None:
        if self.key is None:
            return
        try:
            with self.factory() as session, session.begin():
                record = IdempotencyRecord(owner=self.owner, key=self.key)
                session.add(record)
                session.flush()
                self.record_id = record.id
        except IntegrityError as exc:
            raise Problem(
                409,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is being processed; retry later",
                headers={"Retry-After": "1"},
            ) from exc

    def finish(self, req_hash: str, status_code: int, body: dict[str, Any]) -> None:
        if self.record_id is None:
            return
        with self.factory() as session, session.begin():
            record = session.get(IdempotencyRecord, self.record_id)
            if record is not None:
                record.request_hash = req_hash
                record.status_code = status_code
                record.response_body = body

    def release(self) -> None:
        if self.record_id is None:
            return
        with self.factory() as session, session.begin():
            session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == self.record_id))
        self.record_id = None

    def run(self, req_hash: str, status_code: int, produce) -> JSONResponse:  # noqa: ANN001
        """Replay, refuse, or call ``produce()`` (-> JSON-able body) and remember its result."""
        record = self.existing()
        if record is not None:
            return self.replay(record, req_hash)
        self.reserve()
        try:
            body = produce()
        except BaseException:
            self.release()
            raise
        self.finish(req_hash, status_code, body)
        return JSONResponse(body, status_code=status_code)
