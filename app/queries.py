"""Owner-scoped lookups (another owner's id is a 404, exactly like an unknown one; so is a
deleted lineage or corpus, and the jobs of a deleted lineage) and cursor pagination."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.problems import Problem
from service_core.models import Base, Corpus, Job, Lineage, Stage

RowT = TypeVar("RowT", bound=Base)

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
# ids are INTEGER columns: on PostgreSQL a larger id in a query is an error, not a miss
MAX_ID = 2**31 - 1


def owned(session: Session, model: type[RowT], row_id: int, owner: str, what: str) -> RowT:
    row = session.get(model, row_id) if 0 < row_id <= MAX_ID else None
    if (
        row is None
        or getattr(row, "owner", None) != owner
        or getattr(row, "deleted_at", None) is not None
    ):
        raise Problem(404, f"{what}_not_found", f"no {what} with id {row_id}")
    return row


def owned_lineage(session: Session, lineage_id: int, owner: str) -> Lineage:
    return owned(session, Lineage, lineage_id, owner, "lineage")


def owned_corpus(session: Session, corpus_id: int, owner: str) -> Corpus:
    return owned(session, Corpus, corpus_id, owner, "corpus")


def owned_job(session: Session, job_id: int, owner: str) -> tuple[Job, Stage]:
    """The job and its stage in one query (the status route is the most polled one)."""
    row = (
        session.execute(
            select(Job, Stage)
            .join(Stage, Stage.id == Job.stage_id)
            .join(Lineage, Lineage.id == Job.lineage_id)
            .where(Job.id == job_id, Job.owner == owner, Lineage.deleted_at.is_(None))
        ).first()
        if 0 < job_id <= MAX_ID
        else None
    )
    if row is None:
        raise Problem(404, "job_not_found", f"no job with id {job_id}")
    return row[0], row[1]


def owned_stage(session: Session, lineage_id: int, position: int, owner: str) -> Stage:
    lineage = owned_lineage(session, lineage_id, owner)
    for stage in lineage.stages:
        if stage.position == position:
            return stage
    raise Problem(404, "stage_not_found", f"lineage {lineage_id} has no stage {position}")


def parse_after(after: str | None) -> int:
    if after is None or after == "":
        return 0
    if not after.isdigit() or len(after) > 18:
        raise Problem(
            422,
            "validation_error",
            "after: not a cursor returned by this API",
            errors=[{"field": "after", "message": "not a cursor returned by this API"}],
        )
    return min(int(after), MAX_ID)  # past every id: an empty page (not a database error)


def paginate(
    session: Session,
    stmt: Select,
    id_column,
    after: str | None,
    limit: int,  # noqa: ANN001
) -> tuple[list, bool, str | None]:
    """Rows with id > ``after`` in id order; (rows, has_more, next cursor)."""
    stmt = stmt.where(id_column > parse_after(after)).order_by(id_column).limit(limit + 1)
    rows = list(session.scalars(stmt))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return rows, has_more, (str(rows[-1].id) if has_more and rows else None)
