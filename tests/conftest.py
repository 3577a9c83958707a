"""Shared test set-up: every test builds its models locally (no hub), and the engine's
cache of built-in bases lives in a per-session temp dir."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DAS_ENGINE_CACHE", tempfile.mkdtemp(prefix="das-engine-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
