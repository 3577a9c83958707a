"""Labelled evaluation sets (corpora of purpose ``end_task``): a JSONL upload of
``{"text": str, "label": str | int}`` lines, checked in the request with the engine's own
rules (``das_engine.end_task``), so a set attached to a stage can always be probed."""

from __future__ import annotations

import gzip
from typing import Any

from app.problems import Problem
from app.uploads import StoredFile, check_gzip
from service_core.models import Corpus
from service_core.settings import Settings

PURPOSES = ("pretraining", "end_task")


def check_purpose(value: str | None) -> str:
    purpose = (value or "pretraining").strip()
    if purpose not in PURPOSES:
        raise Problem(
            422,
            "validation_error",
            f"purpose: must be one of {', '.join(PURPOSES)}",
            errors=[{"field": "purpose", "message": f"one of {list(PURPOSES)}"}],
        )
    return purpose


def validate_labelled(settings: Settings, stored: StoredFile) -> tuple[bool, dict[str, Any]]:
    """(compressed, report) of a labelled JSONL upload; raises a 413/422 ``Problem``."""
    from das_engine.end_task import EndTaskError, parse_examples, validate_examples

    name = stored.client_filename.lower()
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise Problem(422, "invalid_end_task", "a labelled set is a .jsonl file (optionally .gz)")
    uncompressed = check_gzip(
        stored.path,
        max_uncompressed=settings.max_uncompressed_bytes,
        max_ratio=settings.max_gzip_ratio,
    )
    raw = (
        gzip.decompress(stored.path.read_bytes())
        if uncompressed is not None
        else stored.path.read_bytes()
    )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(
            422, "invalid_end_task_format", f"{stored.client_filename}: not UTF-8 ({exc.reason})"
        ) from None
    try:
        examples = parse_examples(text.splitlines(), stored.client_filename)
        validate_examples(examples, source=stored.client_filename)
    except EndTaskError as exc:
        raise Problem(422, exc.code, exc.message) from None
    classes: dict[str, int] = {}
    for ex in examples:
        classes[str(ex.label)] = classes.get(str(ex.label), 0) + 1
    report: dict[str, Any] = {
        "ok": True,
        "format": "jsonl",
        "examples": len(examples),
        "documents": len(examples),
        "characters": sum(len(ex.text) for ex in examples),
        "classes": classes,
    }
    if uncompressed is not None:
        report["uncompressed_bytes"] = uncompressed
    return uncompressed is not None, report


def labelled_row(
    settings: Settings, owner: str, stored: StoredFile, compressed: bool, report: dict
) -> Corpus:
    from service_core.storage import stored_path

    return Corpus(
        owner=owner,
        filename=stored.client_filename,
        storage_path=stored_path(settings, stored.path),
        format="jsonl",
        compressed=compressed,
        bytes=stored.bytes,
        sha256=stored.sha256,
        documents=int(report["examples"]),
        characters=int(report["characters"]),
        status="ready",
        report=report,
        purpose="end_task",
    )
