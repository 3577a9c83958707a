"""The names of a lineage's files that more than one module writes or reads, and the one
read-out of an unfinished stage that the service needs (its step checkpoints). No torch:
the web API lists step checkpoints with it, without knowing the directory layout.

    <lineage>/stages/NNN-<slug>.partial/stage.json                 the stage being trained
    <lineage>/stages/NNN-<slug>.partial/checkpoints/step-00000040/trainer.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LINEAGE_FILE = "lineage.json"
STAGES_DIR = "stages"
STAGE_FILE = "stage.json"
PARTIAL_SUFFIX = ".partial"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TRAINER_FILE = "trainer.json"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(directory: Path) -> int | None:
    """The step of a step-checkpoint folder, None for anything else."""
    name = directory.name
    if not name.startswith(STEP_PREFIX) or not name[len(STEP_PREFIX) :].isdigit():
        return None
    return int(name[len(STEP_PREFIX) :])


@dataclass(frozen=True)
class StepCheckpoint:
    step: int
    written_at: float  # POSIX time its trainer.json was written
    path: Path


def step_checkpoints(checkpoints_dir: Path) -> list[StepCheckpoint]:
    """The complete step checkpoints in ``checkpoints_dir``, oldest step first (a folder
    without its trainer.json is one being written, or removed meanwhile: skipped)."""
    out = []
    if not checkpoints_dir.is_dir():
        return out
    for d in checkpoints_dir.iterdir():
        step = step_of(d)
        if step is None:
            continue
        try:
            written = (d / TRAINER_FILE).stat().st_mtime
        except OSError:
            continue
        out.append(StepCheckpoint(step, written, d))
    return sorted(out, key=lambda c: c.step)


def unfinished_stage_checkpoints(
    lineage_dir: Path, position: int, name: str
) -> list[StepCheckpoint]:
    """The step checkpoints of the stage at ``position`` while it is unfinished and is
    domain ``name`` (a partial stage of another domain at that position is not it)."""
    found: list[StepCheckpoint] = []
    root = Path(lineage_dir) / STAGES_DIR
    for partial in root.glob(f"{position:03d}-*{PARTIAL_SUFFIX}"):
        try:
            state = json.loads((partial / STAGE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if state.get("name") == name:
            found.extend(step_checkpoints(partial / CHECKPOINTS_DIR))
    return sorted(found, key=lambda c: c.step)
