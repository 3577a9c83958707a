"""Building a lineage from a request: the base model resolved and checked, hyper-parameters
validated into a TrainingConfig and checked storable, a corpus checked to fill the
configured steps. Shared by the create, add-domain and fork routes."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app import preflight, quotas
from app.base_files import model_files_problem
from app.problems import Problem
from app.queries import owned_corpus
from app.schemas import (
    LineageCreate,
)
from app.storable import json_problems
from service_core.models import (
    Corpus,
    Lineage,
)
from service_core.settings import Settings
from service_core.storage import resolve_stored


def check_base_model_name(name: str, allow_hub: bool) -> None:
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


def hide_models_dir(settings: Settings, message: str) -> str:
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

    check_base_model_name(base_model, settings.allow_hub)
    try:
        info = resolve_base(
            base_model, settings.models_dir, allow_hub=settings.allow_hub, allow_paths=False
        )
    except DasError as exc:
        message = hide_models_dir(settings, exc.message)
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
        path, what = resolve_stored(settings, corpus.storage_path), f"corpus {corpus.public_id}"
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
    general_id: int | None = None
    if body.general_corpus_id is not None:
        with (reads or same_session(session))() as read:
            general = owned_corpus(read, body.general_corpus_id, owner)
            check_corpus_fills(settings, general, config, info, field="general_corpus_id", need=1)
        # still yours, in this transaction
        general_id = owned_corpus(session, body.general_corpus_id, owner).id
    lineage = Lineage(
        owner=owner,
        name=body.name,
        base_model=body.base_model,
        architecture=info.architecture,
        objective=info.objective,
        strategy=body.strategy,
        hyperparameters=hyper,
        general_corpus_id=general_id,
    )
    session.add(lineage)
    session.flush()
    session.refresh(lineage)
    return lineage


def same_session(session: Session):  # noqa: ANN202
    """A factory whose session is ``session`` itself, left open."""
    return lambda: nullcontext(session)
