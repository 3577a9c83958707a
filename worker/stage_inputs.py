"""A job's inputs: what the database says to train (corpus files, base, hyper-parameters)
and the engine lineage to train it in, created on the first stage."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service_core.lifecycle import add_event
from service_core.models import Corpus, Lineage, Stage
from service_core.storage import resolve_stored
from worker.claims import with_db_retry
from worker.progress import PREPARING

if TYPE_CHECKING:
    from worker.run_context import RunContext


@dataclass
class StageSpec:
    lineage_id: int
    stage_id: int
    name: str
    corpus: Path
    eval_corpus: Path | None
    general_corpus: Path | None
    base_model: str
    config: dict


def load_spec(ctx: RunContext) -> StageSpec:
    with ctx.factory() as session:
        job = ctx._owned_job(session)
        stage = session.get(Stage, job.stage_id)
        lineage = session.get(Lineage, job.lineage_id)
        assert stage is not None and lineage is not None

        def corpus_path(corpus_id: int | None) -> Path | None:
            if corpus_id is None:
                return None
            corpus = session.get(Corpus, corpus_id)
            assert corpus is not None
            return resolve_stored(ctx.settings, corpus.storage_path)

        corpus = corpus_path(stage.corpus_id)
        assert corpus is not None
        return StageSpec(
            lineage_id=lineage.id,
            stage_id=stage.id,
            name=stage.name,
            corpus=corpus,
            eval_corpus=corpus_path(stage.eval_corpus_id),
            general_corpus=corpus_path(lineage.general_corpus_id),
            base_model=lineage.base_model,
            config={**lineage.hyperparameters, "strategy": lineage.strategy},
        )


def open_lineage(ctx: RunContext, spec: StageSpec) -> Any:
    from das_engine.lineage import Lineage as EngineLineage

    path = ctx.settings.lineages_dir / str(spec.lineage_id)
    if EngineLineage.exists(path):
        return EngineLineage.open(path)
    # Not created yet, or a creation that crashed half-way: start it afresh.
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)

    def announce() -> None:
        with ctx.factory() as session, session.begin():
            ctx._guarded(session, phase=ctx.tracker.phase)
            add_event(
                session,
                ctx.claim.job_id,
                "preparing",
                f"creating the lineage on {spec.base_model}",
            )

    ctx.tracker.enter(PREPARING)
    ctx._seen_progress = True
    with_db_retry(announce, f"job {ctx.claim.job_id}: preparing")
    return EngineLineage.create(
        path,
        spec.base_model,
        spec.config,
        general_corpus=spec.general_corpus,
        models_dir=ctx.settings.models_dir,
        allow_hub=ctx.settings.allow_hub,
    )
