"""/v1/lineages: lineages, their domains (stages) and metrics (artifacts: artifacts.py)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app import preflight, quotas
from app.auth import Principal, authenticate, get_session
from app.base_files import model_files_problem
from app.corpus_intake import corpus_row, idempotent_upload, validate_upload
from app.idempotency import HEADER, IdempotencyScope, idempotency_header, request_hash
from app.presenters import job_out, json_ok, lineage_out, stage_out
from app.problems import Problem
from app.queries import DEFAULT_LIMIT, MAX_LIMIT, owned_corpus, owned_lineage, paginate
from app.ratelimit import write_access
from app.schemas import (
    DOMAIN_NAME_PATTERN,
    DomainAccepted,
    DomainCreate,
    EndTaskAttach,
    LineageCreate,
    LineageOut,
    MetricsOut,
    Page,
    StageOut,
)
from app.storable import encode_json, json_problems
from app.uploads import MultipartResult
from service_core.lifecycle import add_event, is_runnable, mark_enqueued
from service_core.models import (
    JOB_QUEUED,
    JOB_SUCCEEDED,
    Corpus,
    EndTaskScore,
    EvalScore,
    Job,
    Lineage,
    Stage,
)
from service_core.settings import Settings
from service_core.storage import resolve_stored

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])
AFTER = Query(
    None, max_length=18, pattern=r"^[0-9]*$", description="`next_after` of the previous page"
)
LIMIT = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="items per page")


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


def training_config(hyper: dict[str, Any], strategy: str) -> Any:
    """The lineage's ``TrainingConfig``; a 422 naming each bad hyper-parameter."""
    from das_engine.config import TrainingConfig
    from das_engine.errors import DasError

    try:
        return TrainingConfig.from_dict({**hyper, "strategy": strategy})
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


def resolve_lineage_base(settings: Settings, base_model: str) -> Any:
    """The base model's ``BaseModelInfo`` (422 when it cannot be found or loaded)."""
    from das_engine.bases import resolve_base
    from das_engine.errors import DasError

    _check_base_model_name(base_model, settings.allow_hub)
    try:
        info = resolve_base(
            base_model, settings.models_dir, allow_hub=settings.allow_hub, allow_paths=False
        )
    except DasError as exc:
        message = _hide_models_dir(settings, exc.message)
        raise Problem(
            422, exc.code, message, errors=[{"field": "base_model", "message": message}]
        ) from exc
    local = info.path and str(info.path) != base_model and Path(info.path).is_dir()
    problem = model_files_problem(Path(info.path)) if local else None
    if problem is not None:
        message = f"base model {base_model!r} cannot be loaded: {problem}"
        raise Problem(
            422,
            "base_model_unloadable",
            message,
            errors=[{"field": "base_model", "message": message}],
        )
    return info


def check_storable_hyperparameters(hyper: dict[str, Any]) -> None:
    """422 for anything in ``hyperparameters`` the database could not store or a JSON
    answer could not carry (checked first: even an error message must be able to quote it)."""
    problems = json_problems(hyper, "hyperparameters")
    if problems:
        raise Problem(
            422,
            "invalid_hyperparameters",
            "; ".join(f"{p['field']}: {p['message']}" for p in problems),
            errors=problems,
        )


def check_corpus_fills(
    settings: Settings,
    corpus: Corpus | Path,
    config: Any,
    info: Any,
    *,
    field: str,
    need: int,
) -> preflight.CorpusMeasure:
    """422 ``corpus_too_small`` unless ``corpus`` (a row, or the path of a file just
    uploaded) fills ``need`` chunks at the config's block size with the base's tokenizer.
    Slow for a large corpus (tokenizing): call it outside a write transaction."""
    tokenizer, lock = preflight.tokenizer_for(str(info.path))
    if isinstance(corpus, Path):
        path, what = corpus, "the uploaded corpus"
    else:
        path, what = resolve_stored(settings, corpus.storage_path), f"corpus {corpus.id}"
    measure = preflight.measure_corpus(
        path,
        tokenizer,
        lock,
        block_size=config.block_size,
        objective=info.objective,
        need=need,
        split=(config.seed, config.eval_fraction),
        # an epochs-based job's token quota needs an estimate of the corpus's tokens
        sample_chars=preflight.SAMPLE_CHARS if config.max_steps is None and need == 2 else 0,
    )
    problem = preflight.corpus_problem(
        measure, what=what, field=field, block_size=config.block_size, need=need
    )
    if problem is not None:
        raise problem
    return measure


def build_lineage(
    settings: Settings,
    session: Session,
    owner: str,
    body: LineageCreate,
    *,
    reads: sessionmaker[Session] | None = None,
) -> Lineage:
    """Check everything, then add the lineage to ``session`` (the caller commits). The checks
    read through ``reads`` when given, so that no write lock is held while they tokenize."""
    check_storable_hyperparameters(body.hyperparameters)
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
    config = training_config(hyper, body.strategy)
    info = resolve_lineage_base(settings, body.base_model)
    base = preflight.base_config(str(info.path), allow_hub=settings.allow_hub)
    preflight.check_against_base(settings, config, body.base_model, base)
    quotas.check_job_tokens(settings, quotas.job_tokens(config))
    if body.general_corpus_id is not None:
        with (reads or _same(session))() as read:
            general = owned_corpus(read, body.general_corpus_id, owner)
            check_corpus_fills(settings, general, config, info, field="general_corpus_id", need=1)
        owned_corpus(session, body.general_corpus_id, owner)  # still yours, in this transaction
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


def _same(session: Session):  # noqa: ANN202
    """A factory whose session is ``session`` itself, left open."""
    return lambda: nullcontext(session)


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
    after: str | None = AFTER,
    limit: int = LIMIT,
    principal: Principal = Depends(authenticate),
    session: Session = Depends(get_session),
) -> JSONResponse:
    """Your lineages, oldest first, each with its ordered stages."""
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
    """One of your lineages and its stages."""
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
                            "type": "integer",
                            "description": "one of your corpora to evaluate on instead of a "
                            "held-out split",
                        },
                        "end_task_corpus_id": {
                            "type": "integer",
                            "description": "one of your labelled sets (purpose `end_task`) "
                            "to probe this and every later stage on",
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
            f"lineage {lineage.id} already has a domain named {name!r}",
        )


def preflight_domain(
    settings: Settings,
    session: Session,
    owner: str,
    lineage_id: int,
    name: str,
    corpus: Corpus | Path,
    corpus_characters: int,
    eval_corpus_id: int | None,
    *,
    corpus_field: str = "corpus_id",
) -> None:
    """What the worker would fail on, checked before the write transaction (``session``
    only reads): cheap checks first (ownership, the name, the unfinished-jobs quota), then
    the corpus fills the chunks the engine needs at the lineage's block size, and the job
    stays within the token quota. ``add_domain`` checks the cheap ones again, atomically."""
    lineage = owned_lineage(session, lineage_id, owner)
    eval_corpus = owned_corpus(session, eval_corpus_id, owner) if eval_corpus_id else None
    if isinstance(corpus, Corpus) and corpus.status != "ready":
        raise Problem(422, "corpus_not_ready", f"corpus {corpus.id} is not ready")
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


def owned_labelled_set(session: Session, corpus_id: int, owner: str, field: str) -> Corpus:
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
    lineage_id: int,
    corpus: Corpus,
    name: str,
    eval_corpus_id: int | None,
    *,
    settings: Settings | None = None,
    end_task_corpus_id: int | None = None,
) -> tuple[Stage, Job]:
    """Create the next stage and its queued job (the caller commits, then enqueues). With
    ``settings``, the owner's quota of unfinished jobs applies (counted under the owner's
    lock, in this transaction); the caller ran ``preflight_domain`` before."""
    lineage = owned_lineage(session, lineage_id, owner)
    if eval_corpus_id is not None:
        owned_corpus(session, eval_corpus_id, owner)
    if end_task_corpus_id is not None:
        owned_labelled_set(session, end_task_corpus_id, owner, "end_task_corpus_id")
    if corpus.status != "ready":
        raise Problem(422, "corpus_not_ready", f"corpus {corpus.id} is not ready")
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
        eval_corpus_id=eval_corpus_id,
        end_task_corpus_id=end_task_corpus_id,
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
    lineage_id: int, request: Request, principal: Principal = Depends(write_access)
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
    data: dict[str, Any] = {"corpus_id": 0, "name": fields.get("name")}
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
    summary["end_task"] = end_task_block(session, lineage, stages)
    return _without_non_finite(summary)


def end_task_block(session: Session, lineage: Lineage, stages: list[Stage]) -> dict | None:
    """Accuracy and macro-F1 matrices from ``EndTaskScore`` rows (rows: the base, then each
    trained stage; columns: the domains with a labelled set), with FR/BWT/FWT computed as
    ``das_engine.end_task`` does (on the negated scores)."""
    from das_engine.end_task import summarize_scores

    scores = session.scalars(
        select(EndTaskScore).where(EndTaskScore.lineage_id == lineage.id)
    ).all()
    if not scores:
        return None
    probed = {s.task_stage_id for s in scores}
    tasks = [st for st in stages if st.id in probed]
    cell = {(s.stage_id, s.task_stage_id): s for s in scores}
    rows: list[int | None] = [None, *[st.id for st in stages]]

    def matrix(attr: str) -> list[list[float | None]]:
        return [
            [_finite(getattr(cell[(r, t.id)], attr)) if (r, t.id) in cell else None for t in tasks]
            for r in rows
        ]

    domains, names = [st.name for st in stages], [t.name for t in tasks]
    acc, f1 = matrix("accuracy"), matrix("macro_f1")
    return {
        "rows": ["base", *domains],
        "tasks": names,
        "mode": scores[0].mode,
        "accuracy": acc,
        "macro_f1": f1,
        "summary": {
            "accuracy": summarize_scores(domains, names, acc[0], acc[1:]),
            "macro_f1": summarize_scores(domains, names, f1[0], f1[1:]),
        },
    }


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
    """The lineage's evaluation matrix (loss and perplexity of the model after each stage on every
    domain) and its forgetting summary (forgetting rate, BWT, FWT); non-finite values are null.
    `end_task`: accuracy and macro-F1 of a probe on each labelled set attached to a domain,
    after the base and every stage, with the same summary on those scores.
    """
    lineage = owned_lineage(session, lineage_id, principal.owner)
    return json_ok(MetricsOut(lineage_id=lineage.id, **build_metrics(session, lineage)))


@router.put(
    "/{lineage_id}/stages/{position}/end-task",
    response_model=StageOut,
    summary="Attach a labelled set to a domain (end-task evaluation)",
)
def attach_end_task(
    lineage_id: int,
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
        raise Problem(404, "not_found", f"lineage {lineage_id} has no stage {position}")
    owned_labelled_set(session, body.end_task_corpus_id, principal.owner, "end_task_corpus_id")
    stage.end_task_corpus_id = body.end_task_corpus_id
    session.commit()
    session.refresh(stage)
    return json_ok(stage_out(stage))
