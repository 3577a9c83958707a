"""A lineage's loss matrix between the engine's shape and the database's rows.

The engine reports ``{"domains", "loss_matrix", "base_losses", "general"}``
(``Lineage.metrics``); the database holds one ``EvalScore`` row per finite cell:
``(stage_id, domain, value)`` with ``stage_id`` None for the base model and ``domain``
None for the general reference corpus. The worker stores with ``cells_from_engine``, the
metrics route rebuilds with ``matrix_from_cells``; one is the other's inverse (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from das_engine.jsonsafe import finite


@dataclass(frozen=True)
class LossCell:
    stage_id: int | None  # the model after this stage; None: the base model
    domain: str | None  # scored on this domain's held-out split; None: the general corpus
    value: float


@dataclass
class LossMatrix:
    """The matrix as ``das_engine.metrics.summarize`` takes it (non-finite cells None)."""

    domains: list[str]
    loss_matrix: list[list[float | None]]
    base_losses: list[float | None] | None
    general: dict[str, Any] | None


def cells_from_engine(metrics: Mapping[str, Any], stage_ids: Mapping[str, int]) -> list[LossCell]:
    """The rows to store for the engine's ``metrics``: one per finite value, for the rows of
    the stages in ``stage_ids`` (domain name -> stage id) and the base."""
    domains: list[str] = list(metrics.get("domains") or [])
    cells: list[LossCell] = []

    def add(stage_id: int | None, domain: str | None, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if finite(float(value)) is not None:
                cells.append(LossCell(stage_id, domain, float(value)))

    for row_name, row in zip(domains, metrics.get("loss_matrix") or [], strict=False):
        if row_name in stage_ids:
            for domain, value in zip(domains, row, strict=False):
                add(stage_ids[row_name], domain, value)
    for domain, value in zip(domains, metrics.get("base_losses") or [], strict=False):
        add(None, domain, value)
    general = metrics.get("general") or {}
    if general:
        add(None, None, general.get("base_loss"))
        for row_name, value in zip(domains, general.get("losses") or [], strict=False):
            if row_name in stage_ids:
                add(stage_ids[row_name], None, value)
    return cells


def matrix_from_cells(cells: Iterable[LossCell], stages: Sequence[tuple[int, str]]) -> LossMatrix:
    """The matrix over ``stages`` ((id, domain name) in training order) from stored cells:
    a missing cell is None; base losses and the general block only when some were stored."""
    cell = {(c.stage_id, c.domain): c.value for c in cells}
    domains = [name for _, name in stages]
    matrix = [[finite(cell.get((sid, d))) for d in domains] for sid, _ in stages]
    base = [finite(cell.get((None, d))) for d in domains]
    general_losses = [finite(cell.get((sid, None))) for sid, _ in stages]
    general = None
    if any(v is not None for v in general_losses) or (None, None) in cell:
        general = {"base_loss": finite(cell.get((None, None))), "losses": general_losses}
    return LossMatrix(domains, matrix, base if any(v is not None for v in base) else None, general)
