"""Database rows -> response bodies. Every id shown is a public one (``lin_…``, ``job_…``,
``cor_…``) or a number within its parent (a stage's position, an event's ``seq``); integer
row ids never leave the server. A job's body, ``job_out``, lives in
service_core.job_view: webhook events carry it too."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.schemas import CorpusOut, JobEventOut, LineageOut, StageOut
from service_core.job_view import job_out as job_out  # re-exported
from service_core.models import JOB_SUCCEEDED, Corpus, JobEvent, Lineage, Stage
from service_core.redaction import scrub_data, scrub_text
from service_core.settings import Settings


def corpus_out(corpus: Corpus) -> CorpusOut:
    return CorpusOut(
        id=corpus.public_id,
        filename=corpus.filename,
        format=corpus.format,
        compressed=corpus.compressed,
        bytes=corpus.bytes,
        sha256=corpus.sha256,
        documents=corpus.documents,
        characters=corpus.characters,
        status=corpus.status,
        report=corpus.report,
        purpose=corpus.purpose or "pretraining",
        created_at=corpus.created_at,
    )


def event_out(event: JobEvent, settings: Settings | None = None) -> JobEventOut:
    """An event as users see it. The worker writes events without server details; this
    scrubs them again for rows an older version wrote (``traceback`` events, ``worker``
    keys, absolute paths)."""
    message = event.message
    if event.type == "traceback":
        message = "the details of this error are in the server log"
    return JobEventOut(
        id=event.seq,
        job_id=event.job_public_id,
        created_at=event.created_at,
        level=event.level,
        type=event.type,
        message=scrub_text(message, settings),
        data=scrub_data(event.data or {}, settings),
    )


def stage_out(stage: Stage) -> StageOut:
    job = stage.job
    return StageOut(
        position=stage.position,
        name=stage.name,
        status=job.status,
        corpus_id=stage.corpus_public_id,
        eval_corpus_id=stage.eval_corpus_public_id,
        end_task_corpus_id=stage.end_task_corpus_public_id,
        job_id=job.public_id,
        steps=stage.steps,
        trained_tokens=stage.trained_tokens,
        parameters=stage.parameters,
        growth=stage.growth,
        checkpoint_available=job.status == JOB_SUCCEEDED,
        created_at=stage.created_at,
        finished_at=stage.finished_at,
    )


def lineage_out(lineage: Lineage) -> LineageOut:
    return LineageOut(
        id=lineage.public_id,
        name=lineage.name,
        base_model=lineage.base_model,
        architecture=lineage.architecture,
        objective=lineage.objective,
        strategy=lineage.strategy,
        hyperparameters=lineage.hyperparameters,
        general_corpus_id=lineage.general_corpus_public_id,
        created_at=lineage.created_at,
        stages=[stage_out(s) for s in lineage.stages],
        forked_from_id=lineage.forked_from_public_id,
        forked_from_position=lineage.forked_from_position,
    )


def json_ok(model: BaseModel) -> JSONResponse:
    """A read route's answer, serialised in the endpoint. Returning the model instead would
    make FastAPI validate it again in the thread pool *after* the endpoint, while the
    request's read session still holds its database connection: under load every pool
    thread then waits for a connection that only such a validation would release -- a
    deadlock (found by benchmarks/load_status.py). The model was validated when built."""
    return JSONResponse(model.model_dump(mode="json"))
