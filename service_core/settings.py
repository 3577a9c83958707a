"""Service settings, read once from the environment (pydantic-settings).

The names in ``validation_alias`` are the public contract (scripts and deployments use them):
``DATABASE_URL``, ``CELERY_BROKER_URL``, ``DAS_DATA_DIR``, ``DAS_MODELS_DIR``, ``PORT`` ...
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    # -- where things live -------------------------------------------------------------
    data_dir: Path = Field(Path("./var"), validation_alias=_env("DAS_DATA_DIR", "data_dir"))
    models_dir: Path | None = Field(None, validation_alias=_env("DAS_MODELS_DIR", "models_dir"))
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL", "database_url"))
    celery_broker_url: str | None = Field(
        None, validation_alias=_env("CELERY_BROKER_URL", "celery_broker_url")
    )
    celery_queue: str = Field("das", validation_alias=_env("DAS_CELERY_QUEUE", "celery_queue"))

    # -- HTTP ----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", validation_alias=_env("DAS_HOST", "host"))
    port: int = Field(8000, validation_alias=_env("PORT", "port"))
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("DAS_CORS_ORIGINS", "cors_origins")
    )
    allow_hub: bool = Field(False, validation_alias=_env("DAS_ALLOW_HUB", "allow_hub"))

    # -- input limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(
        1 << 30, validation_alias=_env("DAS_MAX_UPLOAD_BYTES", "max_upload_bytes")
    )
    max_uncompressed_bytes: int = Field(
        8 << 30, validation_alias=_env("DAS_MAX_UNCOMPRESSED_BYTES", "max_uncompressed_bytes")
    )
    max_gzip_ratio: float = Field(
        200.0, validation_alias=_env("DAS_MAX_GZIP_RATIO", "max_gzip_ratio")
    )
    max_line_chars: int = Field(
        1_000_000, validation_alias=_env("DAS_MAX_LINE_CHARS", "max_line_chars")
    )
    max_json_bytes: int = Field(
        1 << 20, validation_alias=_env("DAS_MAX_JSON_BYTES", "max_json_bytes")
    )

    # -- pre-flight checks and per-owner quotas (0: no limit) ------------------------------
    # the device class of the workers: the API cannot see it, and refuses what that class
    # cannot run (fp16 mixed precision on a CPU)
    worker_device: Literal["cpu", "cuda"] = Field(
        "cpu", validation_alias=_env("DAS_WORKER_DEVICE", "worker_device")
    )
    # tokens one job may process: max_steps * batch_size * grad_accum * block_size
    max_job_tokens: int = Field(
        10_000_000_000, ge=0, validation_alias=_env("DAS_MAX_JOB_TOKENS", "max_job_tokens")
    )
    # jobs of one owner not yet finished (queued, running, cancelling)
    max_active_jobs: int = Field(
        16, ge=0, validation_alias=_env("DAS_MAX_ACTIVE_JOBS_PER_OWNER", "max_active_jobs")
    )
    # bytes of one owner's uploaded corpora
    max_storage_bytes: int = Field(
        100 << 30,
        ge=0,
        validation_alias=_env("DAS_MAX_STORAGE_BYTES_PER_OWNER", "max_storage_bytes"),
    )

    # -- abuse control -------------------------------------------------------------------
    rate_limit_per_minute: float = Field(
        600.0, validation_alias=_env("DAS_RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute")
    )
    rate_limit_burst: int = Field(
        120, validation_alias=_env("DAS_RATE_LIMIT_BURST", "rate_limit_burst")
    )
    idempotency_ttl_seconds: int = Field(
        86400, validation_alias=_env("DAS_IDEMPOTENCY_TTL_SECONDS", "idempotency_ttl_seconds")
    )

    # -- status reads --------------------------------------------------------------------
    # one shared poll per watched job and API process feeds every stream and conditional
    # read of it: a change reaches clients within one tick
    stream_poll_seconds: float = Field(
        0.05, gt=0, validation_alias=_env("DAS_STREAM_POLL_SECONDS", "stream_poll_seconds")
    )
    stream_keepalive_seconds: float = Field(
        15.0,
        gt=0,
        validation_alias=_env("DAS_STREAM_KEEPALIVE_SECONDS", "stream_keepalive_seconds"),
    )
    # a stream is closed after this long (without `event: end`): EventSource reconnects
    # with Last-Event-ID, and no connection is held for ever
    stream_max_seconds: float = Field(
        600.0, gt=0, validation_alias=_env("DAS_STREAM_MAX_SECONDS", "stream_max_seconds")
    )
    # conditional reads (If-None-Match) trust a verified key for this long: a revoked key
    # can still get 304s from this process for at most that time
    auth_cache_seconds: float = Field(
        2.0, ge=0, validation_alias=_env("DAS_AUTH_CACHE_SECONDS", "auth_cache_seconds")
    )

    # -- worker --------------------------------------------------------------------------
    lease_seconds: float = Field(60.0, validation_alias=_env("DAS_LEASE_SECONDS", "lease_seconds"))
    # a job whose worker died this many times (kill -9, the kernel's OOM killer, a node
    # lost) fails with error.code "worker_lost" instead of killing the next worker too
    max_attempts: int = Field(3, ge=1, validation_alias=_env("DAS_MAX_ATTEMPTS", "max_attempts"))
    # a job's child process runs at this niceness (0-19): training is throughput-bound and
    # takes every core it gets; the API beside it answers status reads, which are
    # latency-bound. 0 keeps the scheduler's default (equal shares).
    job_nice: int = Field(10, ge=0, le=19, validation_alias=_env("DAS_JOB_NICE", "job_nice"))
    event_every_steps: int = Field(
        10, validation_alias=_env("DAS_EVENT_EVERY_STEPS", "event_every_steps")
    )
    progress_interval_seconds: float = Field(
        1.0, validation_alias=_env("DAS_PROGRESS_INTERVAL_SECONDS", "progress_interval_seconds")
    )
    sweep_interval_seconds: float = Field(
        30.0, validation_alias=_env("DAS_SWEEP_INTERVAL_SECONDS", "sweep_interval_seconds")
    )
    sweep_stale_seconds: float = Field(
        600.0, validation_alias=_env("DAS_SWEEP_STALE_SECONDS", "sweep_stale_seconds")
    )

    # -- webhooks (delivered by a thread of every worker process) ------------------------------
    # attempts of one event (the first included); then it is marked failed
    webhook_max_attempts: int = Field(
        8, ge=1, le=100, validation_alias=_env("DAS_WEBHOOK_MAX_ATTEMPTS", "webhook_max_attempts")
    )
    webhook_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        validation_alias=_env("DAS_WEBHOOK_TIMEOUT_SECONDS", "webhook_timeout_seconds"),
    )
    # the wait after the n-th failed attempt: base * 2**(n-1), plus up to 25 % jitter, at most
    # the maximum (defaults: 30 s, 1 min, 2 min, ... about 1 h 4 min over 8 attempts)
    webhook_backoff_seconds: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("DAS_WEBHOOK_BACKOFF_SECONDS", "webhook_backoff_seconds"),
    )
    webhook_backoff_max_seconds: float = Field(
        6 * 3600.0,
        gt=0,
        validation_alias=_env("DAS_WEBHOOK_BACKOFF_MAX_SECONDS", "webhook_backoff_max_seconds"),
    )
    # how often the dispatcher looks for due deliveries
    webhook_poll_seconds: float = Field(
        1.0, gt=0, validation_alias=_env("DAS_WEBHOOK_POLL_SECONDS", "webhook_poll_seconds")
    )
    # endpoints one worker process sends to at once (one request at a time to each)
    webhook_concurrency: int = Field(
        4, ge=1, le=64, validation_alias=_env("DAS_WEBHOOK_CONCURRENCY", "webhook_concurrency")
    )
    # finished deliveries (delivered, failed, cancelled) older than this leave the log (0: kept)
    webhook_retention_days: float = Field(
        30.0,
        ge=0,
        validation_alias=_env("DAS_WEBHOOK_RETENTION_DAYS", "webhook_retention_days"),
    )
    # endpoints one owner may register (0: no limit)
    webhook_max_endpoints: int = Field(
        20,
        ge=0,
        validation_alias=_env("DAS_WEBHOOK_MAX_ENDPOINTS_PER_OWNER", "webhook_max_endpoints"),
    )
    # false: URLs whose host is (or resolves to) a loopback, private, link-local, multicast
    # or otherwise non-public address are refused at registration and at each delivery
    webhook_allow_private: bool = Field(
        False, validation_alias=_env("DAS_WEBHOOK_ALLOW_PRIVATE", "webhook_allow_private")
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("data_dir", "models_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    # -- derived -------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL; ``postgresql://`` is taken to mean the psycopg 3 driver."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'das.sqlite3'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def resolved_broker_url(self) -> str:
        return self.celery_broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def lineages_dir(self) -> Path:
        return self.data_dir / "lineages"

    @property
    def local_key_file(self) -> Path:
        return self.data_dir / "local-api-key"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (entry points only; libraries take a ``Settings``)."""
    return Settings()
