"""DELETE /v1/corpora/{id} and DELETE /v1/lineages/{id} (rules: app/deletion.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select

from app.auth import Principal
from app.deletion import delete_corpus, delete_lineage
from app.path_ids import CorpusPath, LineagePath
from app.queries import owned_corpus, owned_lineage
from app.ratelimit import write_access
from app.schemas_lifecycle import problem_responses
from service_core.models import Job
from service_core.purge import purge_lineage

router = APIRouter(tags=["lifecycle"])


@router.delete(
    "/v1/corpora/{corpus_id}",
    status_code=204,
    responses=problem_responses(409, 429),
    summary="Delete a corpus (its file; 409 while an unfinished stage uses it)",
    description="Removes the corpus file at once (204). 409 `corpus_in_use` while a queued "
    "or running stage uses it, or while it is the general corpus of a lineage that has not "
    "trained a stage yet. Finished stages keep naming it; the corpus itself answers 404.",
)
def remove_corpus(
    corpus_id: CorpusPath, request: Request, principal: Principal = Depends(write_access)
) -> Response:
    settings = request.app.state.settings
    with request.app.state.session_factory() as session, session.begin():
        delete_corpus(settings, session, owned_corpus(session, corpus_id, principal.owner))
    return Response(status_code=204)


@router.delete(
    "/v1/lineages/{lineage_id}",
    status_code=204,
    responses=problem_responses(409, 429),
    summary="Delete a lineage and its artifacts (409 while a stage trains, unless force)",
    description="Cancels its queued jobs and removes its folder: models, importance "
    "snapshots, tokenized data, step checkpoints (204). 409 `lineage_training` while a "
    "stage trains, unless `force=true`: then that job is cancelled cooperatively and the "
    "files go once its worker stopped. The lineage answers 404 from then on.",
)
def remove_lineage(
    lineage_id: LineagePath,
    request: Request,
    force: bool = Query(
        False, description="cancel a training stage; its files go once its worker stopped"
    ),
    principal: Principal = Depends(write_access),
) -> Response:
    settings = request.app.state.settings
    factory = request.app.state.session_factory
    with factory() as session, session.begin():
        lineage = owned_lineage(session, lineage_id, principal.owner)
        delete_lineage(session, lineage, force=force)
        row_id = lineage.id
        jobs = session.scalars(select(Job.public_id).where(Job.lineage_id == row_id)).all()
    for job_id in jobs:  # this process's conditional reads answer 404 at once (read-your-writes)
        request.app.state.job_watcher.forget(job_id)
    purge_lineage(settings, factory, row_id)  # does nothing while a job still trains
    return Response(status_code=204)
