"""das_engine: continual domain-adaptive pre-training with soft-masking (DAS).

A library a researcher can use alone (``das-engine`` CLI); it imports nothing of the
web service. Main entry point: :class:`das_engine.lineage.Lineage`.
"""

__version__ = "0.1.0"


def _quiet_libraries() -> None:
    """Per-shard progress bars of datasets/transformers drown the engine's own progress."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


_quiet_libraries()
