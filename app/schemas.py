"""Request and response bodies (pydantic), apart from the database rows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from app.hyperparameters import hyperparameters_schema
from app.storable import text_problem
from das_engine.names import DOMAIN_NAME_PATTERN
from das_engine.strategy_registry import strategy_names

# defined with their presenter, which webhook events use too (re-exported)
from service_core.job_view import JobError as JobError
from service_core.job_view import JobOut as JobOut

T = TypeVar("T")
# every strategy the engine ships (das_engine/strategies/, found by its registry)
StrategyName = Literal[strategy_names()]  # type: ignore[valid-type]
# ids are opaque strings with a type prefix (service_core.public_ids); a longer one is no id
ID_MAX = 64


def _as_id_text(value: Any) -> Any:
    """A number where an id is expected (an id of the integer era) is an unknown id (404,
    like any id that names nothing), not a type error."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# a reference to one of the caller's rows in a request body (`cor_…`)
BodyId = Annotated[str, BeforeValidator(_as_id_text)]
CORPUS_EXAMPLE = "cor_8yQe2kTnV4xWb7LmA0sZ"
LINEAGE_EXAMPLE = "lin_3hGk9PqRt2VwXy5ZaB1c"
JOB_EXAMPLE = "job_Q7mN4pLs2XcV9bKd1FhJ"


def _storable(value: str) -> str:
    why = text_problem(value)
    if why:
        raise ValueError(why)
    return value


# any valid Unicode on one line (emoji, CJK, RTL, combining marks): no lone surrogate, NUL
# or other control character, which the database or a JSON answer could not hold
StorableText = Annotated[str, AfterValidator(_storable)]
# validated by das_engine's TrainingConfig (so that its errors name each field); the schema
# documents it, generated from the dataclass
Hyperparameters = Annotated[dict[str, Any], WithJsonSchema(hyperparameters_schema())]


class Page(BaseModel, Generic[T]):
    data: list[T] = Field(description="this page's items, oldest first")
    has_more: bool = Field(description="true when another page follows")
    next_after: str | None = Field(
        None, description="pass as `after` to get the next page; null on the last page"
    )


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(description="`urn:das-service:problem:<code>`")
    title: str = Field(description="the HTTP status phrase")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong, for people")
    code: str = Field(description="what went wrong, for programs (stable)")
    instance: str | None = Field(None, description="the request path")
    errors: list[dict[str, Any]] | None = Field(
        None, description="`[{field, message}]` (or `[{line, message}]` for a corpus)"
    )


# -- base models --------------------------------------------------------------------------


class BaseModelOut(BaseModel):
    id: str = Field(description="the id to pass as a lineage's `base_model`")
    architecture: str = Field(description="the Hugging Face `model_type`")
    objective: Literal["mlm", "clm"] = Field(description="masked or causal language modelling")
    parameters: int = Field(description="parameter count (from the config)")


# -- corpora ------------------------------------------------------------------------------


class CorpusOut(BaseModel):
    id: str = Field(description="the corpus id (`cor_…`)", examples=[CORPUS_EXAMPLE])
    filename: str = Field(description="the client's file name, for display only")
    format: str = Field(description="`txt` or `jsonl`")
    compressed: bool = Field(description="the upload was gzip")
    bytes: int = Field(description="size of the upload as sent (counted in your storage quota)")
    sha256: str = Field(description="SHA-256 of the upload as sent")
    documents: int = Field(description="documents found")
    characters: int = Field(description="characters of those documents")
    status: str = Field(description="`ready`: validated and usable")
    report: dict[str, Any] = Field(description="the validation report of das_engine")
    created_at: datetime = Field(description="upload time (UTC)")
    purpose: Literal["pretraining", "end_task"] = Field(
        "pretraining",
        description="`pretraining`: text to train on; `end_task`: a labelled evaluation set",
    )


# -- lineages -----------------------------------------------------------------------------


class LineageCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "demo",
                    "base_model": "tiny-roberta",
                    "strategy": "das",
                    "hyperparameters": {"max_steps": 20, "batch_size": 8, "block_size": 32},
                }
            ]
        },
    )

    name: StorableText = Field(
        min_length=1, max_length=200, description="a name for you (any Unicode on one line)"
    )
    base_model: StorableText = Field(
        min_length=1,
        max_length=500,
        description="an id from `GET /v1/base-models` (or a hub name where the server allows)",
    )
    strategy: StrategyName = Field("das", description="the continual-learning method")
    hyperparameters: Hyperparameters = Field(
        default_factory=dict,
        description="training settings; checked against the base model (`block_size` within "
        "its positions) and the server's quotas",
    )
    general_corpus_id: BodyId | None = Field(
        None,
        max_length=ID_MAX,
        description="one of your corpora (its `cor_…` id): a general-domain text on which "
        "every stage's forgetting is measured",
    )


class StageOut(BaseModel):
    position: int = Field(description="order in the lineage, from 1")
    name: str = Field(description="the domain name")
    status: str = Field(description="its job's status")
    corpus_id: str = Field(description="the domain corpus (`cor_…`)")
    eval_corpus_id: str | None = Field(description="a separate evaluation corpus, if any")
    end_task_corpus_id: str | None = Field(
        None, description="the labelled set (purpose `end_task`) this domain is probed on"
    )
    job_id: str = Field(description="the job training it (`job_…`)")
    steps: int | None = Field(description="training steps, once trained")
    trained_tokens: int | None = Field(description="tokens trained on, once trained")
    parameters: int | None = Field(
        None, description="the stage checkpoint's parameter count, once trained"
    )
    growth: dict[str, Any] | None = Field(
        None,
        description="what the strategy grew, once trained (null for strategies that do not "
        "grow): `elle`: `parameters_before`, `parameters`, `intermediate_size`, `num_layers`, "
        "`expanded`, `warmup_steps`, `warmup_gap` (first and last recovery-loss step); "
        "`cpt`: `plugin_size`, `plugin_parameters`, `mask_neurons` (per domain so far, per "
        "layer), `claimed_neurons` (per layer), `export_mask`, `export_units`",
    )
    checkpoint_available: bool = Field(description="its checkpoint can be downloaded")
    created_at: datetime = Field(description="creation time (UTC)")
    finished_at: datetime | None = Field(description="when its job finished")


class LineageOut(BaseModel):
    id: str = Field(description="the lineage id (`lin_…`)", examples=[LINEAGE_EXAMPLE])
    name: str = Field(description="its name")
    base_model: str = Field(description="the base model id")
    architecture: str = Field(description="the base's Hugging Face `model_type`")
    objective: str = Field(description="`mlm` or `clm`")
    strategy: str = Field(description="the continual-learning method")
    hyperparameters: dict[str, Any] = Field(description="the hyper-parameters given")
    general_corpus_id: BodyId | None = Field(description="the general corpus, if any")
    created_at: datetime = Field(description="creation time (UTC)")
    stages: list[StageOut] = Field(description="its stages, in order")
    forked_from_id: str | None = Field(
        None, description="a fork's parent lineage (POST .../fork); else null"
    )
    forked_from_position: int | None = Field(
        None, description="the parent's stage the fork branched after; else null"
    )


class DomainCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"corpus_id": CORPUS_EXAMPLE, "name": "news"}]},
    )

    corpus_id: BodyId = Field(
        max_length=ID_MAX,
        description="one of your corpora (its `cor_…` id): at the lineage's `block_size` it "
        "must fill at least two chunks (one to train on, one held out)",
    )
    name: str = Field(
        pattern=DOMAIN_NAME_PATTERN,
        description="the domain name, unique among the lineage's live stages: 1 to 64 of "
        "`[A-Za-z0-9_.-]`, starting with a letter or digit",
    )
    eval_corpus_id: BodyId | None = Field(
        None,
        max_length=ID_MAX,
        description="one of your corpora to evaluate on instead of a held-out split",
    )
    end_task_corpus_id: BodyId | None = Field(
        None,
        max_length=ID_MAX,
        description="one of your labelled sets (POST /v1/corpora with `purpose=end_task`): "
        "after this and every later stage the model is probed on it (accuracy, macro-F1)",
    )


class EndTaskAttach(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end_task_corpus_id: BodyId = Field(
        max_length=ID_MAX,
        description="one of your labelled sets (purpose `end_task`) to probe this domain on",
    )


class EndTaskSummary(BaseModel):
    aligned_tasks: list[str] = Field(description="domains that have a labelled task")
    forgetting_rate: float | None = Field(description="mean A[i][i] - A[T-1][i] over tasks")
    bwt: float | None = Field(description="backward transfer (negative: forgetting)")
    fwt: float | None = Field(description="forward transfer against the base model")
    max_forgetting: float | None = Field(description="largest forgetting of one task")
    final_mean: float | None = Field(description="mean score of the last stage's model")


class EndTaskMetrics(BaseModel):
    rows: list[str] = Field(description="`base`, then the domain trained by each stage")
    tasks: list[str] = Field(description="columns: the domains whose labelled set was probed")
    mode: str = Field(description="the probe: `linear` or `finetune`")
    accuracy: list[list[float | None]] = Field(
        description="row t: the model after stage t (row 0: the base), column j: accuracy "
        "on task j's held-out split, in [0, 1]; null: not probed yet"
    )
    macro_f1: list[list[float | None]] = Field(description="the same cells' macro-F1")
    summary: dict[str, EndTaskSummary] = Field(
        description="FR/BWT/FWT of each matrix (`accuracy`, `macro_f1`), from "
        "das_engine.metrics on the negated scores (higher is better)"
    )


class DomainAccepted(BaseModel):
    stage: StageOut = Field(description="the new stage")
    job: JobOut = Field(description="the job that trains it")


class JobEventOut(BaseModel):
    id: int = Field(
        description="the event's number within its job (1, 2, ...): the `after` cursor and "
        "the server-sent event id"
    )
    job_id: str = Field(description="its job (`job_…`)")
    created_at: datetime = Field(description="when it happened (UTC)")
    level: Literal["debug", "info", "warning", "error"] = Field(description="severity")
    type: str = Field(description="`queued`, `claimed`, `progress`, `succeeded`, ...")
    message: str = Field(description="for people")
    data: dict[str, Any] = Field(description="for programs (progress figures, an error)")


class StageGrowth(BaseModel):
    position: int = Field(description="the stage's position")
    name: str = Field(description="its domain")
    parameters: int | None = Field(description="the stage checkpoint's parameter count")
    growth: dict[str, Any] | None = Field(description="the strategy's growth record, if any")


class MetricsOut(BaseModel):
    lineage_id: str = Field(description="the lineage (`lin_…`)")
    domains: list[str] = Field(description="trained domains, in order")
    loss_matrix: list[list[float | None]] = Field(
        description="row i: the model after stage i, column j: loss on domain j's held-out text"
    )
    perplexity_matrix: list[list[float | None]] = Field(description="exp of `loss_matrix`")
    base_losses: list[float | None] | None = Field(description="the base model's losses")
    forgetting_rate: float | None = Field(description="mean forgetting, relative")
    bwt: float | None = Field(description="backward transfer")
    fwt: float | None = Field(description="forward transfer")
    max_forgetting: float | None = Field(description="largest forgetting of one domain")
    per_domain: list[dict[str, Any]] = Field(description="figures per domain")
    general: dict[str, Any] = Field(description="the general corpus's losses, if any")
    end_task: EndTaskMetrics | None = Field(
        None,
        description="end-task scores (labelled sets attached to domains): accuracy and "
        "macro-F1 per (after stage, task); null while none was probed",
    )
    growth: list[StageGrowth] = Field(
        default_factory=list,
        description="per trained stage, in order: the checkpoint's parameter count and what "
        "the strategy grew (`elle`, `cpt`; null for the others), as in the lineage's stages",
    )


class Health(BaseModel):
    status: str = Field(description="`ok`")
    checks: dict[str, str] = Field(default_factory=dict, description="each dependency's state")
