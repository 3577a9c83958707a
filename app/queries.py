"""Owner-scoped lookups by public id (another owner's id is a 404, exactly like an unknown
or malformed one; so is a deleted lineage or corpus, and the jobs of a deleted lineage) and
cursor pagination (the cursor is the public id of a page's last row)."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Query
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.problems import Problem
from service_core import public_ids
from service_core.models import ApiKey, Base, Corpus, Job, Lineage, Stage, WebhookEndpoint

RowT = TypeVar("RowT", bound=Base)

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
# ids are INTEGER columns: on PostgreSQL a larger id in a query is an error, not a miss
MAX_ID = 2**31 - 1
# the public id's type prefix of each table a route looks up
PREFIX: dict[type, str] = {
    Lineage: public_ids.LINEAGE,
    Job: public_ids.JOB,
    Corpus: public_ids.CORPUS,
    ApiKey: public_ids.API_KEY,
    WebhookEndpoint: public_ids.WEBHOOK,
}
# a cursor field: a public id of the page's type (checked by the route) or empty
CURSOR_PATTERN = r"^([a-z]{3}_[A-Za-z0-9]{20})?$"


def cursor_query(description: str = "`next_after` of the previous page") -> Any:
    """The ``after`` query parameter of a list route (an opaque cursor)."""
    return Query(None, max_length=24, pattern=CURSOR_PATTERN, description=description)


def owned(session: Session, model: type[RowT], public_id: str, owner: str, what: str) -> RowT:
    """The owner's row with that public id; a malformed id is not even looked up."""
    row = (
        session.scalar(select(model).where(model.public_id == public_id))  # type: ignore[attr-defined]
        if public_ids.is_public_id(public_id, PREFIX[model])
        else None
    )
    if (
        row is None
        or getattr(row, "owner", None) != owner
        or getattr(row, "deleted_at", None) is not None
    ):
        raise Problem(404, f"{what}_not_found", f"no {what} with id {shown(public_id)}")
    return row


def shown(value: object) -> str:
    """An id as a problem's detail repeats it: short, printable, quoted when not an id."""
    text = str(value)
    if text.isascii() and text.isprintable() and len(text) <= 40 and " " not in text:
        return text
    return repr(text[:40])


def owned_lineage(session: Session, lineage_id: str, owner: str) -> Lineage:
    return owned(session, Lineage, lineage_id, owner, "lineage")


def owned_corpus(session: Session, corpus_id: str, owner: str) -> Corpus:
    return owned(session, Corpus, corpus_id, owner, "corpus")


def owned_job(session: Session, job_id: str, owner: str) -> tuple[Job, Stage]:
    """The job and its stage in one query (the status route is the most polled one)."""
    row = (
        session.execute(
            select(Job, Stage)
            .join(Stage, Stage.id == Job.stage_id)
            .join(Lineage, Lineage.id == Job.lineage_id)
            .where(Job.public_id == job_id, Job.owner == owner, Lineage.deleted_at.is_(None))
        ).first()
        if public_ids.is_public_id(job_id, public_ids.JOB)
        else None
    )
    if row is None:
        raise Problem(404, "job_not_found", f"no job with id {shown(job_id)}")
    return row[0], row[1]


def owned_stage(session: Session, lineage_id: str, position: int, owner: str) -> Stage:
    lineage = owned_lineage(session, lineage_id, owner)
    for stage in lineage.stages:
        if stage.position == position:
            return stage
    raise Problem(404, "stage_not_found", f"lineage {lineage_id} has no stage {position}")


def bad_cursor() -> Problem:
    return Problem(
        422,
        "validation_error",
        "after: not a cursor returned by this API",
        errors=[{"field": "after", "message": "not a cursor returned by this API"}],
    )


def parse_seq(after: str | None) -> int:
    """An events cursor: the number of the last event seen in that job (0: from the start)."""
    if after is None or after == "":
        return 0
    if not after.isdigit() or len(after) > 18:
        raise bad_cursor()
    return min(int(after), MAX_ID)  # past every event: an empty page (not a database error)


def parse_after(session: Session, model: type[Base], after: str | None, owner: str) -> int:
    """The row id a page cursor (the public id of the previous page's last row, one of the
    caller's) stands for; 0 for the first page. Any other value is a 422."""
    if after is None or after == "":
        return 0
    row_id = (
        session.scalar(
            select(model.id).where(  # type: ignore[attr-defined]
                model.public_id == after,  # type: ignore[attr-defined]
                model.owner == owner,  # type: ignore[attr-defined]
            )
        )
        if public_ids.is_public_id(after, PREFIX[model])
        else None
    )
    if row_id is None:
        raise bad_cursor()
    return row_id


def paginate(
    session: Session,
    stmt: Select,
    model: type[Base],
    after: str | None,
    limit: int,
    owner: str,
) -> tuple[list, bool, str | None]:
    """The owner's rows after the cursor ``after`` in creation order; (rows, has_more,
    next cursor: the last row's public id)."""
    id_column = model.id  # type: ignore[attr-defined]
    stmt = stmt.where(id_column > parse_after(session, model, after, owner))
    rows = list(session.scalars(stmt.order_by(id_column).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return rows, has_more, (rows[-1].public_id if has_more and rows else None)
