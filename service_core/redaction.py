"""What users never see of the server: its folders (data, models, the Python environment,
the source tree), its host name and process ids. Job messages and event data pass through
:func:`scrub_text` / :func:`scrub_data` before they are stored and again before they are
shown (rows written by an older version may still hold such details)."""

from __future__ import annotations

import re
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from service_core.settings import Settings

# event data keys that only ever held server details (older versions wrote them)
PRIVATE_KEYS = frozenset({"worker", "worker_id", "host", "hostname", "pid", "traceback"})


@lru_cache
def _environment_folders() -> tuple[tuple[str, str], ...]:
    repo = Path(__file__).resolve().parent.parent
    folders = {
        sys.prefix: "$PYTHON_ENV",
        sys.base_prefix: "$PYTHON_ENV",
        sys.exec_prefix: "$PYTHON_ENV",
        str(repo): "$DAS_SOURCE",
        str(Path.home()): "~",
    }
    return tuple((f, name) for f, name in folders.items() if len(f) > 1)


def _replacements(settings: Settings | None) -> list[tuple[str, str]]:
    pairs = []
    if settings is not None:
        pairs.append((str(settings.data_dir), "$DAS_DATA_DIR"))
        if settings.models_dir is not None:
            pairs.append((str(settings.models_dir), "$DAS_MODELS_DIR"))
    pairs.extend(_environment_folders())
    # the longest first: a folder inside another is named by its own name
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def _host_pattern() -> re.Pattern[str]:
    host = re.escape(socket.gethostname())
    # "host:pid" (a worker's identity), or the host name as a whole word
    return re.compile(rf"\b{host}(?::\d+)?\b")


def scrub_text(text: str, settings: Settings | None = None) -> str:
    for folder, name in _replacements(settings):
        text = text.replace(folder, name)
    return _host_pattern().sub("$HOST", text)


def scrub_data(value: Any, settings: Settings | None = None) -> Any:
    """``value`` (an event's JSON data) without private keys, and its strings scrubbed."""
    if isinstance(value, dict):
        return {k: scrub_data(v, settings) for k, v in value.items() if str(k) not in PRIVATE_KEYS}
    if isinstance(value, list):
        return [scrub_data(v, settings) for v in value]
    if isinstance(value, str):
        return scrub_text(value, settings)
    return value
