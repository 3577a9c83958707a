"""Typed engine errors: each carries a stable machine-readable ``code`` so callers
(the CLI, the REST service) can report problems precisely without parsing messages."""

from __future__ import annotations


class DasError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "engine_error"

    def __init__(self, message: str, *, details: list[dict] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class ConfigError(DasError):
    """A hyper-parameter is unknown or out of range."""

    code = "invalid_hyperparameters"


class IncompatibleConfigError(ConfigError):
    """The hyper-parameters are valid but this model or device cannot run them (a block
    longer than the model's positions, fp16 on a CPU...); raised before any work."""

    code = "incompatible_hyperparameters"


class CorpusError(DasError):
    """A corpus file cannot be used (encoding, emptiness, malformed JSONL...)."""

    code = "invalid_corpus"


class BaseModelError(DasError):
    """The base model cannot be found or loaded."""

    code = "base_model_unloadable"


class UnsupportedArchitectureError(DasError):
    """No unit map exists for this model family."""

    code = "unsupported_architecture"


class ImportanceError(DasError):
    """Importance cannot be computed meaningfully (e.g. the proxy KL with dropout off)."""

    code = "importance_invalid"


class LineageError(DasError):
    """The lineage directory is missing, corrupt, or the request conflicts with it."""

    code = "lineage_error"


class DomainExistsError(LineageError):
    code = "domain_exists"


class LineageBusyError(LineageError):
    """Another process holds the lineage's write lock (e.g. a worker that lost its lease
    but has not yet reached its next step boundary)."""

    code = "lineage_busy"


class Cancelled(DasError):
    """Raised at a step boundary when the caller asked to stop."""

    code = "cancelled"
