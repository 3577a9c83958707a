"""/v1/corpora: streamed uploads with validation reports."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import quotas
from app.auth import Principal, authenticate, get_session
from app.corpus_intake import corpus_row, idempotent_upload, validate_upload
from app.idempotency import HEADER, idempotency_header
from app.labelled_sets import check_purpose, labelled_row, validate_labelled
from app.path_ids import CorpusPath
from app.presenters import corpus_out, json_ok
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, cursor_query, owned_corpus, paginate
from app.ratelimit import write_access
from app.schemas import CorpusOut, Page
from app.storable import encode_json
from app.uploads import MultipartResult
from service_core.models import Corpus

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".txt or .jsonl (a 'text' field per line), "
                            "optionally .gz; with `purpose=end_task`: .jsonl of "
                            '`{"text": str, "label": str | int}` lines',
                        },
                        "purpose": {
                            "type": "string",
                            "enum": ["pretraining", "end_task"],
                            "default": "pretraining",
                            "description": "`pretraining`: text to train a domain on; "
                            "`end_task`: a labelled evaluation set to attach to a domain "
                            "(`end_task_corpus_id`), probed after every stage",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=CorpusOut,
    summary="Upload a corpus (multipart, streamed)",
    dependencies=[Depends(idempotency_header)],
    openapi_extra=UPLOAD_BODY,
)
async def upload_corpus(
    request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    """Upload a corpus as multipart field `file` (.txt or .jsonl, optionally .gz), streamed to
    disk. It is validated in the request (encoding, JSON lines, emptiness, gzip bombs: a 4xx
    naming each problem with its line, nothing kept). Form field `purpose=end_task` (as in
    the OpenAI/Together files APIs) uploads a labelled evaluation set instead: JSONL of
    `{"text": str, "label": str | int}`, at least 8 examples, two classes and 2 per class
    (422 `invalid_end_task_format` / `end_task_too_few_examples` /
    `end_task_too_few_classes` otherwise). Counts against your storage quota
    (`DAS_MAX_STORAGE_BYTES_PER_OWNER`, 403). Honours `Idempotency-Key`.
    """
    settings = request.app.state.settings
    factory = request.app.state.session_factory

    def handle(result: MultipartResult) -> dict:
        if result.file is None:
            raise Problem(
                422,
                "validation_error",
                "file: a file part named 'file' is required",
                errors=[{"field": "file", "message": "required"}],
            )
        purpose = check_purpose(result.fields.get("purpose"))
        if purpose == "end_task":
            compressed, report = validate_labelled(settings, result.file)
        else:
            fmt, compressed, report = validate_upload(settings, result.file)
        with factory() as session, session.begin():
            quotas.lock_owner(session, principal.owner)
            quotas.check_storage(settings, session, principal.owner, adding=result.file.bytes)
            if purpose == "end_task":
                corpus = labelled_row(settings, principal.owner, result.file, compressed, report)
            else:
                corpus = corpus_row(settings, principal.owner, result.file, fmt, compressed, report)
            session.add(corpus)
            session.flush()
            answer = corpus_out(corpus).model_dump(mode="json")
            encode_json(answer)  # the answer can be sent: only then is the row committed
            return answer

    if HEADER not in request.headers:  # (a replay is answered whatever the usage now)
        await run_in_threadpool(_storage_left, request, principal.owner)
    return await idempotent_upload(request, principal.owner, 201, handle)


def _storage_left(request: Request, owner: str) -> None:
    """403 before the upload streams in when the owner's quota is already used up."""
    with request.app.state.read_session_factory() as session:
        quotas.check_storage(request.app.state.settings, session, owner, adding=0)


@router.get("", response_model=Page[CorpusOut], summary="List your corpora")
def list_corpora(
    after: str | None = cursor_query(),
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="items per page"),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """Your corpora, oldest first, each with its validation report."""
    stmt = select(Corpus).where(Corpus.owner == principal.owner, Corpus.deleted_at.is_(None))
    rows, has_more, cursor = paginate(session, stmt, Corpus, after, limit, principal.owner)
    return json_ok(
        Page[CorpusOut](data=[corpus_out(c) for c in rows], has_more=has_more, next_after=cursor)
    )


@router.get("/{corpus_id}", response_model=CorpusOut, summary="A corpus and its report")
def get_corpus(
    corpus_id: CorpusPath,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """One of your corpora and its validation report."""
    return json_ok(corpus_out(owned_corpus(session, corpus_id, principal.owner)))
