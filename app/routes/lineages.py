"""/v1/lineages: lineages, their domains (stages) and metrics (artifacts: artifacts.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import Principal, authenticate, get_session
from app.base_files import model_files_problem
from app.corpus_intake import corpus_row, idempotent_upload, validate_upload
from app.idempotency import IdempotencyScope, request_hash
from app.lifecycle import add_event, is_runnable, mark_enqueued
from app.models import (
    JOB_QUEUED,
    JOB_SUCCEEDED,
    Corpus,
    EvalScore,
    Job,
    Lineage,
    Stage,
)
from app.presenters import job_out, json_ok, lineage_out, stage_out
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, owned_corpus, owned_lineage, paginate
from app.ratelimit import write_access
from app.schemas import (
    DOMAIN_NAME_PATTERN,
    DomainAccepted,
    DomainCreate,
    LineageCreate,
    LineageOut,
    MetricsOut,
    Page,
)
from app.settings import Settings
from app.uploads import MultipartResult

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])


# -- lineages -----------------------------------------------------------------------------


def _check_base_model_name(name: str, allow_hub: bool) -> None:
    """Only server-side ids (and hub names where allowed) -- never a path on the server."""
    looks_like_path = name.startswith(("/", "~", ".")) or "\\" in name or ".." in name.split("/")
    if looks_like_path or ("/" in name and not allow_hub):
        raise Problem(
            422,
            "base_model_unloadable",
            f"base_model {name[:100]!r} is not a known base model id"
            + ("" if allow_hub else " (this server has no hub access; see GET /v1/base-models)"),
            errors=[{"field": "base_model", "message": "unknown base model"}],
        )


def _hide_models_dir(settings: Settings, message: str) -> str:
    """The server's folders are nobody's business: name them as the configuration does."""
    if settings.models_dir is not None:
        message = message.replace(str(settings.models_dir), "$DAS_MODELS_DIR")
    return message


def build_lineage(settings: Settings, session: Session, owner: str, body: LineageCreate) -> Lineage:
    from das_engine.bases import resolve_base
    from das_engine.config import TrainingConfig
    from das_engine.errors import DasError

    hyper = dict(body.hyperparameters)
    if hyper.get("strategy", body.strategy) != body.strategy:
        raise Problem(
            422,
            "invalid_hyperparameters",
            "hyperparameters.strategy contradicts strategy",
            errors=[{"field": "hyperparameters.strategy", "message": "must equal strategy"}],
        )
    hyper.pop("strategy", None)
    if hyper.get("device", "auto") != "auto":
        raise Problem(
            422,
            "invalid_hyperparameters",
            "hyperparameters.device is chosen by the server (each worker trains on its own "
            "accelerator); leave it out or set it to 'auto'",
            errors=[{"field": "hyperparameters.device", "message": "must be 'auto'"}],
        )
    try:
        TrainingConfig.from_dict({**hyper, "strategy": body.strategy})
    except DasError as exc:
        raise Problem(
            422,
            exc.code,
            exc.message,
            errors=[
                {"field": f"hyperparameters.{d.get('field')}", "message": d.get("message", "")}
                for d in exc.details
            ],
        ) from exc
    _check_base_model_name(body.base_model, settings.allow_hub)
    try:
        info = resolve_base(
            body.base_model, settings.models_dir, allow_hub=settings.allow_hub, allow_paths=False
        )
    except DasError as exc:
        message = _hide_models_dir(settings, exc.message)
        raise Problem(
            422, exc.code, message, errors=[{"field": "base_model", "message": message}]
        ) from exc
    local = info.path and str(info.path) != body.base_model and Path(info.path).is_dir()
    problem = model_files_problem(Path(info.path)) if local else None
    if problem is not None:
        message = f"base model {body.base_model!r} cannot be loaded: {problem}"
        raise Problem(
            422,
            "base_model_unloadable",
            message,
            errors=[{"field": "base_model", "message": message}],
        )
    if body.general_corpus_id is not None:
        owned_corpus(session, body.general_corpus_id, owner)
    lineage = Lineage(
        owner=owner,
        name=body.name,
        base_model=body.base_model,
        architecture=info.architecture,
        objective=info.objective,
        strategy=body.strategy,
        hyperparameters=hyper,
        general_corpus_id=body.general_corpus_id,
    )
    session.add(lineage)
    session.flush()
    session.refresh(lineage)
    return lineage


@router.post("", status_code=201, response_model=LineageOut, summary="Create a lineage")
def create_lineage(
    body: LineageCreate, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    settings = request.app.state.settings
    factory = request.app.state.session_factory
    scope = IdempotencyScope.from_request(request, principal.owner)

    def produce() -> dict:
        with factory() as session, session.begin():
            lineage = build_lineage(settings, session, principal.owner, body)
            return lineage_out(lineage).model_dump(mode="json")

    return scope.run(request_hash(scope.endpoint, body.model_dump(mode="json")), 201, produce)


@router.get("", response_model=Page[LineageOut], summary="List your lineages")
def list_lineages(
    after: str | None = Query(None, max_length=18, pattern=r"^[0-9]*$"),
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    stmt = select(Lineage).where(Lineage.owner == principal.owner, Lineage.deleted_at.is_(None))
    rows, has_more, cursor = paginate(session, stmt, Lineage.id, after, limit)
    return json_ok(
        Page[LineageOut](data=[lineage_out(r) for r in rows], has_more=has_more, next_after=cursor)
    )


@router.get("/{lineage_id}", response_model=LineageOut, summary="A lineage and its stages")
def get_lineage(
    lineage_id: int,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    return json_ok(lineage_out(owned_lineage(session, lineage_id, principal.owner)))


# -- domains ------------------------------------------------------------------------------

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
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "pattern": DOMAIN_NAME_PATTERN},
                        "eval_corpus_id": {"type": "integer"},
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
            f"lineage {lineage.id} already has a domain named {name!r}",
        )


def add_domain(
    session: Session,
    owner: str,
    lineage_id: int,
    corpus: Corpus,
    name: str,
    eval_corpus_id: int | None,
) -> tuple[Stage, Job]:
    """Create the next stage and its queued job (the caller commits, then enqueues)."""
    lineage = owned_lineage(session, lineage_id, owner)
    if eval_corpus_id is not None:
        owned_corpus(session, eval_corpus_id, owner)
    if corpus.status != "ready":
        raise Problem(422, "corpus_not_ready", f"corpus {corpus.id} is not ready")
    _check_domain_name_free(session, lineage, name)
    position = (
        session.scalar(select(func.max(Stage.position)).where(Stage.lineage_id == lineage.id)) or 0
    ) + 1
    stage = Stage(
        lineage_id=lineage.id,
        position=position,
        name=name,
        active_name=name,
        corpus_id=corpus.id,
        eval_corpus_id=eval_corpus_id,
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
        data={"corpus_id": corpus.id, "position": position},
    )
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
    openapi_extra=DOMAIN_BODY,
)
async def post_domain(
    lineage_id: int, request: Request, principal: Principal = Depends(write_access)
) -> JSONResponse:
    settings = request.app.state.settings
    factory = request.app.state.session_factory
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()

    if ctype == "multipart/form-data":

        def precheck() -> None:
            with factory() as session:
                owned_lineage(session, lineage_id, principal.owner)

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
            with factory() as session:
                corpus = corpus_row(settings, principal.owner, result.file, fmt, compressed, report)
                session.add(corpus)
                session.flush()
                stage, job = add_domain(
                    session, principal.owner, lineage_id, corpus, body.name, body.eval_corpus_id
                )
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
        with factory() as session:
            corpus = owned_corpus(session, body.corpus_id, principal.owner)
            stage, job = add_domain(
                session, principal.owner, lineage_id, corpus, body.name, body.eval_corpus_id
            )
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
    extra = set(fields) - {"name", "eval_corpus_id"}
    data: dict[str, Any] = {"corpus_id": 0, "name": fields.get("name")}
    if fields.get("eval_corpus_id"):
        data["eval_corpus_id"] = fields["eval_corpus_id"]
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


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def build_metrics(session: Session, lineage: Lineage) -> dict[str, Any]:
    """The matrix from stored ``EvalScore`` rows, summarised by ``das_engine.metrics``."""
    from das_engine.metrics import summarize

    stages = [s for s in lineage.stages if s.job.status == JOB_SUCCEEDED]
    domains = [s.name for s in stages]
    scores = session.scalars(
        select(EvalScore).where(EvalScore.lineage_id == lineage.id, EvalScore.metric == "loss")
    ).all()
    cell = {(s.stage_id, s.domain): s.value for s in scores}
    matrix = [[_finite(cell.get((st.id, d))) for d in domains] for st in stages]
    base = [_finite(cell.get((None, d))) for d in domains]
    general: dict[str, Any] = {}
    general_losses = [_finite(cell.get((st.id, None))) for st in stages]
    if any(v is not None for v in general_losses) or (None, None) in cell:
        general = {
            "base_loss": _finite(cell.get((None, None))),
            "losses": general_losses,
        }
    summary = summarize(
        domains, matrix, base if any(v is not None for v in base) else None, general or None
    )
    return _without_non_finite(summary)


def _without_non_finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: such a value is reported as null."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _without_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_non_finite(v) for v in value]
    return value


@router.get("/{lineage_id}/metrics", response_model=MetricsOut, summary="Forgetting metrics")
def get_metrics(
    lineage_id: int,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    lineage = owned_lineage(session, lineage_id, principal.owner)
    return json_ok(MetricsOut(lineage_id=lineage.id, **build_metrics(session, lineage)))
