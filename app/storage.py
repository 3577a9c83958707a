"""Where files live: paths kept in the database are relative to ``DAS_DATA_DIR`` when they are
inside it, so the data folder can move as a whole."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings


def stored_path(settings: Settings, path: Path) -> str:
    """How a path is kept in the database."""
    try:
        return path.resolve().relative_to(settings.data_dir).as_posix()
    except ValueError:
        return str(path.resolve())


def resolve_stored(settings: Settings, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else settings.data_dir / path
