"""Where files live: paths kept in the database are relative to ``DAS_DATA_DIR`` when they are
inside it, so the data folder can move as a whole. Also the removal of a deleted lineage's
folder and of a deleted corpus's file."""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from service_core.settings import Settings


def stored_path(settings: Settings, path: Path) -> str:
    """How a path is kept in the database."""
    try:
        return path.resolve().relative_to(settings.data_dir).as_posix()
    except ValueError:
        return str(path.resolve())


def resolve_stored(settings: Settings, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else settings.data_dir / path


def lineage_dir(settings: Settings, lineage_id: int) -> Path:
    """The engine's folder of a lineage (created by the worker at its first stage)."""
    return settings.lineages_dir / str(int(lineage_id))


def remove_lineage_tree(path: Path) -> bool:
    """Remove a lineage's folder unless a trainer holds its lock (the engine's ``.lock``,
    ``flock`` while ``add_domain`` runs); True when nothing of it is left."""
    if not path.exists():
        return True
    lock = path / ".lock"
    handle = lock.open("a") if lock.exists() else None
    try:
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if handle is not None:
            handle.close()
    return not path.exists()


def remove_upload(settings: Settings, value: str) -> None:
    """Remove a stored upload and its folder (each upload gets a fresh one under
    ``uploads/``); a path outside the uploads folder loses only the file itself."""
    path = resolve_stored(settings, value)
    path.unlink(missing_ok=True)
    folder = path.parent
    try:
        inside = folder.resolve().is_relative_to(settings.uploads_dir.resolve())
        if inside and folder.resolve() != settings.uploads_dir.resolve():
            folder.rmdir()  # only when empty
    except OSError:
        pass
