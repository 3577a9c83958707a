"""das_engine: continual domain-adaptive pre-training with soft-masking (DAS).

A library a researcher can use alone (``das-engine`` CLI); it imports nothing of the
web service. Main entry point: :class:`das_engine.lineage.Lineage`.
"""

__version__ = "0.1.0"


def quiet_libraries() -> None:
    """Per-shard progress bars of datasets/transformers drown the engine's own progress.

    Called by the modules that load models (not at package import: importing
    ``das_engine.config`` -- as the web API does -- must not pull in transformers)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _quiet_environment() -> None:
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


_quiet_environment()
