"""/v1/lineages/{id}/domains: add a domain (a stage and its training job), from an uploaded
corpus id (JSON) or a corpus uploaded in the same request (multipart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import preflight, quotas
from app.auth import Principal, get_session
from app.corpus_intake import corpus_row, idempotent_upload, validate_upload
from app.idempotency import HEADER, IdempotencyScope, idempotency_header, request_hash
from app.lineage_building import (
    check_corpus_fills,
    resolve_lineage_base,
    training_config,
)
from app.path_ids import LineagePath
from app.presenters import job_out, json_ok, stage_out
from app.problems import Problem
from app.queries import owned_corpus, owned_lineage
from app.ratelimit import write_access
from app.schemas import (
    DomainAccepted,
    DomainCreate,
    EndTaskAttach,
    StageOut,
)
from app.storable import encode_json
from app.uploads import MultipartResult
from das_engine.names import DOMAIN_NAME_PATTERN
from service_core.lifecycle import add_event, is_runnable, mark_enqueued, status_changed
from service_core.models import (
    JOB_QUEUED,
    Corpus,
    Job,
    Lineage,
    Stage,
)
from service_core.settings import Settings

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])


DOMAIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DomainCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the domain corpus: .txt or .jsonl (a 'text' field "
                            "per line), optionally .gz; validated like POST /v1/corpora, kept "
                            "as a corpus of yours, and it must fill two chunks of the "
                            "lineage's block_size",
                        },
                        "name": {
                            "type": "string",
                            "pattern": DOMAIN_NAME_PATTERN,
                            "description": "the domain name (see the JSON body's `name`)",
                        },
                        "eval_corpus_id": {
                            "type": "string",
                            "description": "one of your corpora (`cor_…`) to evaluate on "
                            "instead of a held-out split",
                        },
                        "end_task_corpus_id": {
                            "type": "string",
                            "description": "one of your labelled sets (`cor_…`, purpose "
                            "`end_task`) to probe this and every later stage on",
                        },
                    },
                }
            },
        },
    }
}


def _check_domain_name_free(session: Session, lineage: Lineage, name: str) -> None:
    taken = session.scalar(
        select(Stage.id).where(Stage.lineage_id == lineage.id, Stage.active_name == name)
    )
    if taken is not None:
        raise Problem(
            409,
            "domain_exists",
            f"lineage {lineage.public_id} already has a domain named {name!r}",
        )


def preflight_domain(
    settings: Settings,
    session: Session,
    owner: str,
    lineage_id: str,
    name: str,
    corpus: Corpus | Path,
    corpus_characters: int,
    eval_corpus_id: str | None,
    *,
    corpus_field: str = "corpus_id",
) -> None:
    """What the worker would fail on, checked before the write transaction (``session``
    only reads): cheap checks first (ownership, the name, the unfinished-jobs quota), then
    the corpus fills the chunks the engine needs at the lineage's block size, and the job
    stays within the token quota. ``add_domain`` checks the cheap ones again, atomically."""
    lineage = owned_lineage(session, lineage_id, owner)
    eval_corpus = (
        owned_corpus(session, eval_corpus_id, owner) if eval_corpus_id is not None else None
    )
    if isinstance(corpus, Corpus) and corpus.status != "ready":
        raise Problem(422, "corpus_not_ready", f"corpus {corpus.public_id} is not ready")
    _check_domain_name_free(session, lineage, name)
    quotas.check_active_jobs(settings, session, owner, adding=1)
    config = training_config(lineage.hyperparameters, lineage.strategy)
    info = resolve_lineage_base(settings, lineage.base_model)
    measure = check_corpus_fills(settings, corpus, config, info, field=corpus_field, need=2)
    if eval_corpus is not None:
        check_corpus_fills(settings, eval_corpus, config, info, field="eval_corpus_id", need=1)
    tokens = quotas.job_tokens(config)
    if tokens is None:
        estimate = preflight.epochs_job_tokens(config, measure, corpus_characters)
        quotas.check_job_tokens(settings, estimate, estimated=True)
    else:
        quotas.check_job_tokens(settings, tokens)


def owned_labelled_set(session: Session, corpus_id: str, owner: str, field: str) -> Corpus:
    """One of the owner's corpora of purpose ``end_task`` (404 if foreign, 422 if not one)."""
    corpus = owned_corpus(session, corpus_id, owner)
    if corpus.purpose != "end_task":
        raise Problem(
            422,
            "not_a_labelled_set",
            f"{field}: corpus {corpus_id} is not a labelled set (upload it with purpose=end_task)",
            errors=[{"field": field, "message": "not a labelled set"}],
        )
    return corpus


def add_domain(
    session: Session,
    owner: str,
    lineage_id: str,
    corpus: Corpus,
    name: str,
    eval_corpus_id: str | None,
    *,
    settings: Settings | None = None,
    end_task_corpus_id: str | None = None,
) -> tuple[Stage, Job]:
    """Create the next stage and its queued job (the caller commits, then enqueues). With
    ``settings``, the owner's quota of unfinished jobs applies (counted under the owner's
    lock, in this transaction); the caller ran ``preflight_domain`` before."""
    lineage = owned_lineage(session, lineage_id, owner)
    eval_corpus = (
        owned_corpus(session, eval_corpus_id, owner) if eval_corpus_id is not None else None
    )
    labelled = (
        owned_labelled_set(session, end_task_corpus_id, owner, "end_task_corpus_id")
        if end_task_corpus_id is not None
        else None
    )
    if corpus.status != "ready":
        raise Problem(422, "corpus_not_ready", f"corpus {corpus.public_id} is not ready")
    _check_domain_name_free(session, lineage, name)
    if settings is not None:
        quotas.lock_owner(session, owner)
        quotas.check_active_jobs(settings, session, owner, adding=1)
    position = (
        session.scalar(select(func.max(Stage.position)).where(Stage.lineage_id == lineage.id)) or 0
    ) + 1
    stage = Stage(
        lineage_id=lineage.id,
        position=position,
        name=name,
        active_name=name,
        corpus_id=corpus.id,
        eval_corpus_id=eval_corpus.id if eval_corpus else None,
        end_task_corpus_id=labelled.id if labelled else None,
    )
    session.add(stage)
    session.flush()
    job = Job(stage_id=stage.id, lineage_id=lineage.id, owner=owner, status=JOB_QUEUED)
    session.add(job)
    session.flush()
    add_event(
        session,
        job.id,
        "queued",
        f"stage {position} ({name}) queued",
        data={"corpus_id": corpus.public_id, "position": position},
    )
    status_changed(session, job)
    session.flush()
    session.refresh(stage)
    return stage, job


def _commit_domain(session: Session) -> None:
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent request took the position or the name
        session.rollback()
        raise Problem(
            409,
            "conflict",
            "the lineage changed concurrently (or the domain name is taken); retry the request",
        ) from exc


def _check_answer(stage: Stage, job: Job) -> None:
    """The 202 can be sent for these rows: checked before they are committed."""
    encode_json(
        DomainAccepted(stage=stage_out(stage), job=job_out(job, stage)).model_dump(mode="json")
    )


def _accepted(request: Request, stage: Stage, job: Job) -> dict:
    """Send the job if it may start now, then answer 202 {stage, job}."""
    factory = request.app.state.session_factory
    with factory() as session, session.begin():
        runnable = is_runnable(session, session.get(Job, job.id))
    if runnable:
        sent = request.app.state.enqueue([job.id])
        with factory() as session, session.begin():
            mark_enqueued(session, sent)
    with factory() as session:
        stage = session.get(Stage, stage.id)
        assert stage is not None
        return DomainAccepted(stage=stage_out(stage), job=job_out(stage.job, stage)).model_dump(
            mode="json"
        )


@router.post(
    "/{lineage_id}/domains",
    status_code=202,
    response_model=DomainAccepted,
    summary="Add a domain: train the lineage's next stage (JSON, or multipart with the file)",
    dependencies=[Depends(idempotency_header)],
    openapi_extra=DOMAIN_BODY,
)
async def post_domain(
    lineage_id: LineagePath, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    """Add a domain: creates the lineage's next stage and its job (202). Send JSON naming one of
    your corpora, or multipart with the file itself. Checked in the request (pre-flight), so a
    job is never queued to fail: the name is free, the corpus fills at least two chunks of the
    lineage's `block_size` with the base's tokenizer (422 `corpus_too_small`), the job stays
    within `DAS_MAX_JOB_TOKENS` (422) and you have fewer than `DAS_MAX_ACTIVE_JOBS_PER_OWNER`
    unfinished jobs (429). Stages run strictly in order. Honours `Idempotency-Key`.
    """
    settings = request.app.state.settings
    factory = request.app.state.session_factory
    reads = request.app.state.read_session_factory
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()

    if ctype == "multipart/form-data":

        def precheck() -> None:  # refuse before the upload streams in, where we can
            with factory() as session:
                owned_lineage(session, lineage_id, principal.owner)
                if HEADER not in request.headers:  # (a replay is answered whatever the usage)
                    quotas.check_active_jobs(settings, session, principal.owner, adding=1)
                    quotas.check_storage(settings, session, principal.owner, adding=0)

        await run_in_threadpool(precheck)

        def handle(result: MultipartResult) -> dict:
            if result.file is None:
                raise Problem(
                    422,
                    "validation_error",
                    "file: a file part is required",
                    errors=[{"field": "file", "message": "required"}],
                )
            body = _domain_fields(result.fields)
            fmt, compressed, report = validate_upload(settings, result.file)
            with reads() as read:
                preflight_domain(
                    settings,
                    read,
                    principal.owner,
                    lineage_id,
                    body.name,
                    result.file.path,
                    int(report.get("characters", 0)),
                    body.eval_corpus_id,
                    corpus_field="file",
                )
            with factory() as session:
                quotas.lock_owner(session, principal.owner)
                quotas.check_storage(settings, session, principal.owner, adding=result.file.bytes)
                corpus = corpus_row(settings, principal.owner, result.file, fmt, compressed, report)
                session.add(corpus)
                session.flush()
                stage, job = add_domain(
                    session,
                    principal.owner,
                    lineage_id,
                    corpus,
                    body.name,
                    body.eval_corpus_id,
                    settings=settings,
                    end_task_corpus_id=body.end_task_corpus_id,
                )
                _check_answer(stage, job)
                _commit_domain(session)
            return _accepted(request, stage, job)

        return await idempotent_upload(request, principal.owner, 202, handle)

    if ctype not in ("application/json", ""):
        raise Problem(415, "unsupported_media_type", "send application/json or multipart/form-data")
    raw = await _small_body(request, settings.max_json_bytes)
    try:
        body = DomainCreate.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc
    scope = IdempotencyScope.from_request(request, principal.owner)

    def produce() -> dict:
        with reads() as read:
            corpus = owned_corpus(read, body.corpus_id, principal.owner)
            preflight_domain(
                settings,
                read,
                principal.owner,
                lineage_id,
                body.name,
                corpus,
                corpus.characters,
                body.eval_corpus_id,
            )
        with factory() as session:
            corpus = owned_corpus(session, body.corpus_id, principal.owner)
            stage, job = add_domain(
                session,
                principal.owner,
                lineage_id,
                corpus,
                body.name,
                body.eval_corpus_id,
                settings=settings,
                end_task_corpus_id=body.end_task_corpus_id,
            )
            _check_answer(stage, job)
            _commit_domain(session)
        return _accepted(request, stage, job)

    req_hash = request_hash(scope.endpoint, body.model_dump(mode="json"))
    return await run_in_threadpool(scope.run, req_hash, 202, produce)


async def _small_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request on an upload path (the global JSON cap skips those)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload_too_large", f"the request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Problem(413, "payload_too_large", f"the request body exceeds {limit} bytes")
    return bytes(body)


def _domain_fields(fields: dict[str, str]) -> DomainCreate:
    extra = set(fields) - {"name", "eval_corpus_id", "end_task_corpus_id"}
    data: dict[str, Any] = {"corpus_id": "", "name": fields.get("name")}
    for key in ("eval_corpus_id", "end_task_corpus_id"):
        if fields.get(key):
            data[key] = fields[key]
    try:
        if extra:
            raise Problem(
                422,
                "validation_error",
                f"unknown form field(s): {sorted(extra)}",
                errors=[{"field": f, "message": "unknown field"} for f in sorted(extra)],
            )
        return DomainCreate.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        raise Problem(
            422,
            "validation_error",
            "; ".join(f"{e['field']}: {e['message']}" for e in errors),
            errors=errors,
        ) from exc


# -- metrics ------------------------------------------------------------------------------


@router.put(
    "/{lineage_id}/stages/{position}/end-task",
    response_model=StageOut,
    summary="Attach a labelled set to a domain (end-task evaluation)",
)
def attach_end_task(
    lineage_id: LineagePath,
    position: int,
    body: EndTaskAttach,
    principal: Principal = Depends(write_access),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """Attach (or replace) the labelled set a domain is probed on. Stages that finish from now
    on are probed on it, and the cells missing for earlier stages and the base are filled at
    the next stage's end-task phase. 404 for a foreign lineage, stage or set."""
    lineage = owned_lineage(session, lineage_id, principal.owner)
    stage = next((s for s in lineage.stages if s.position == position), None)
    if stage is None:
        raise Problem(404, "stage_not_found", f"lineage {lineage_id} has no stage {position}")
    labelled = owned_labelled_set(
        session, body.end_task_corpus_id, principal.owner, "end_task_corpus_id"
    )
    stage.end_task_corpus_id = labelled.id
    session.commit()
    session.refresh(stage)
    return json_ok(stage_out(stage))
