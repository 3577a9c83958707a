"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Raise :class:`Problem` from anywhere in a request; the handlers installed by
:func:`install_problem_handlers` turn it (and FastAPI's own 404/405/422, and any unexpected
exception) into a problem body. A body never carries a stack trace or a secret.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.storable import scrub

log = logging.getLogger("das.api")

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An error answered as problem+json: ``code`` is stable and machine-readable."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extensions = extensions


def problem_body(
    status: int,
    code: str,
    detail: str,
    *,
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:das-service:problem:{code}",
        "title": _title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    body.update(extensions)
    # an error may quote the input that caused it: keep the answer strict UTF-8 JSON
    return scrub(body)


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, code, detail, instance=instance, errors=errors, **extensions),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body",)] or [str(p) for p in loc]
    return ".".join(parts)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.code,
            exc.detail,
            instance=request.url.path,
            errors=exc.errors,
            headers=exc.headers,
            **exc.extensions,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no resource at {request.method} {request.url.path}"
        if exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return problem_response(
            exc.status_code,
            _STATUS_CODES.get(exc.status_code, "http_error"),
            detail,
            instance=request.url.path,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _loc(e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
            for e in exc.errors()
        ]
        return problem_response(
            422,
            "validation_error",
            "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request",
            instance=request.url.path,
            errors=errors,
        )

    @app.exception_handler(OperationalError)
    async def _database(request: Request, exc: OperationalError) -> JSONResponse:
        # a dropped connection, a database restart, a lock time-out: worth a retry
        log.warning(
            "database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
        )
        return problem_response(
            503,
            "database_unavailable",
            "the database is unavailable for a moment; retry the request",
            instance=request.url.path,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        # a value the database refused (out of its column's range, a character it cannot
        # hold): its transaction was rolled back, so nothing of the request is stored. The
        # request checks should have caught it first: logged as a warning to be fixed.
        log.warning(
            "database refused a value on %s %s: %s",
            request.method,
            request.url.path,
            type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
        )
        return problem_response(
            422,
            "unstorable_value",
            "a value of the request cannot be stored (out of range or not representable)",
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500,
            "internal_error",
            "an unexpected error occurred; it has been logged",
            instance=request.url.path,
        )
