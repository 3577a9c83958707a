"""The service's side of the results boundary: the loss matrix stored as rows and rebuilt
(service_core.loss_matrix), and the API's domain-name rule being the engine's."""

import math

import pytest
from pydantic import ValidationError

from app.schemas import DomainCreate
from das_engine.metrics import summarize
from das_engine.names import domain_name_problem
from service_core.loss_matrix import LossCell, cells_from_engine, matrix_from_cells


def engine_metrics(general: bool = True) -> dict:
    """``Lineage.metrics()``'s shape for three stages ("新闻" shows names are opaque)."""
    return summarize(
        ["news", "law", "新闻"],
        [[2.0, 3.0, 4.0], [2.5, 1.5, math.nan], [2.75, 1.75, 1.25]],
        [3.5, 3.25, math.inf],
        {"base_loss": 4.0, "losses": [4.25, None, 4.5]} if general else None,
    )


def test_the_matrix_survives_storing_and_rebuilding():
    metrics = engine_metrics()
    ids = {"news": 11, "law": 12, "新闻": 13}
    cells = cells_from_engine(metrics, ids)
    # one row per finite value: 8 of 9 cells, 2 of 3 base losses, 1 + 2 general
    assert len(cells) == 8 + 2 + 3
    assert LossCell(12, "law", 1.5) in cells and LossCell(None, None, 4.0) in cells
    assert not any(c.value != c.value or abs(c.value) == math.inf for c in cells)
    m = matrix_from_cells(reversed(cells), [(11, "news"), (12, "law"), (13, "新闻")])
    assert m.domains == ["news", "law", "新闻"]
    assert m.loss_matrix == [[2.0, 3.0, 4.0], [2.5, 1.5, None], [2.75, 1.75, 1.25]]
    assert m.base_losses == [3.5, 3.25, None]
    assert m.general == {"base_loss": 4.0, "losses": [4.25, None, 4.5]}
    again = summarize(m.domains, m.loss_matrix, m.base_losses, m.general)
    assert again["bwt"] == metrics["bwt"] and again["fwt"] == metrics["fwt"]


def test_rows_of_unknown_stages_are_not_stored_and_missing_ones_rebuild_as_none():
    cells = cells_from_engine(engine_metrics(general=False), {"news": 11, "新闻": 13})
    assert {c.stage_id for c in cells} == {11, 13, None}
    m = matrix_from_cells(cells, [(11, "news"), (12, "law"), (13, "新闻")])
    assert m.loss_matrix[1] == [None, None, None] and m.general is None


def test_nothing_stored_rebuilds_without_base_or_general():
    m = matrix_from_cells([], [(1, "news")])
    assert m.loss_matrix == [[None]] and m.base_losses is None and m.general is None


@pytest.mark.parametrize(
    "name",
    ["news", "cs.AI", "x" * 64, "x" * 65, "naïve", "新闻", "ｎｅｗｓ", "a b", "-x", "news\n", ""],
)
def test_the_api_accepts_exactly_the_engines_domain_names(name):
    try:
        DomainCreate(corpus_id=1, name=name)
        api_ok = True
    except ValidationError:
        api_ok = False
    assert api_ok == (domain_name_problem(name) is None)
