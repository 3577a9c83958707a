"""From an uploaded file to a ``Corpus`` row: store (streamed), check gzip, validate with
``das_engine.data.validate_corpus``. A bad corpus is a 422 naming each problem (with its line
number) and nothing is kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.idempotency import IdempotencyScope, request_hash
from app.problems import Problem
from app.uploads import MultipartResult, StoredFile, check_gzip, detect_format, receive_multipart
from service_core.models import Corpus
from service_core.settings import Settings
from service_core.storage import stored_path


def validate_upload(settings: Settings, stored: StoredFile) -> tuple[str, bool, dict[str, Any]]:
    """(format, compressed, report) of a stored upload; raises a 413/422 ``Problem``."""
    from das_engine.data import validate_corpus

    fmt, _ = detect_format(stored.path.name)
    uncompressed = check_gzip(
        stored.path,
        max_uncompressed=settings.max_uncompressed_bytes,
        max_ratio=settings.max_gzip_ratio,
    )
    if stored.bytes == 0:
        raise Problem(
            422,
            "invalid_corpus",
            "the file is empty",
            errors=[{"line": None, "message": "the file is empty"}],
        )
    report = validate_corpus(
        stored.path,
        max_line_chars=settings.max_line_chars,
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
    )
    if not report.ok:
        first = report.problems[0] if report.problems else {"line": None, "message": "invalid"}
        where = f"line {first['line']}: " if first.get("line") else ""
        more = report.problem_count - 1
        raise Problem(
            422,
            "invalid_corpus",
            f"{stored.client_filename}: {where}{first['message']}"
            + (f" (and {more} more problem(s))" if more > 0 else ""),
            errors=[{"line": p.get("line"), "message": p["message"]} for p in report.problems],
            problem_count=report.problem_count,
        )
    data = report.to_dict()
    if uncompressed is not None:
        data["uncompressed_bytes"] = uncompressed
    return report.format or fmt, uncompressed is not None, data


def corpus_row(
    settings: Settings, owner: str, stored: StoredFile, fmt: str, compressed: bool, report: dict
) -> Corpus:
    return Corpus(
        owner=owner,
        filename=stored.client_filename,
        storage_path=stored_path(settings, stored.path),
        format=fmt,
        compressed=compressed,
        bytes=stored.bytes,
        sha256=stored.sha256,
        documents=int(report.get("documents", 0)),
        characters=int(report.get("characters", 0)),
        status="ready",
        report=report,
    )


def upload_meaning(result: MultipartResult) -> dict[str, Any]:
    stored = result.file
    return {
        "fields": result.fields,
        "file": None
        if stored is None
        else {"name": stored.client_filename, "sha256": stored.sha256, "bytes": stored.bytes},
    }


async def idempotent_upload(
    request: Request,
    owner: str,
    status_code: int,
    handle: Callable[[MultipartResult], dict[str, Any]],
) -> JSONResponse:
    """Stream a multipart body and call ``handle`` (in a thread) with it, under the request's
    Idempotency-Key. ``handle`` returns the response body and persists what it needs; on any
    error the stored file is removed."""
    settings: Settings = request.app.state.settings
    scope = IdempotencyScope.from_request(request, owner)
    record = await run_in_threadpool(scope.existing)
    if record is not None:  # hash the body only, to tell a replay from a conflicting reuse
        result = await receive_multipart(request, None, max_bytes=settings.max_upload_bytes)
        return scope.replay(record, request_hash(scope.endpoint, upload_meaning(result)))
    await run_in_threadpool(scope.reserve)
    result = MultipartResult()
    try:
        result = await receive_multipart(
            request, settings.uploads_dir, max_bytes=settings.max_upload_bytes
        )
        body = await run_in_threadpool(handle, result)
    except BaseException:
        result.discard()
        await run_in_threadpool(scope.release)
        raise
    req_hash = request_hash(scope.endpoint, upload_meaning(result))
    await run_in_threadpool(scope.finish, req_hash, status_code, body)
    return JSONResponse(body, status_code=status_code)
