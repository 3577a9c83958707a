"""Opaque public ids (``lin_…``, ``job_…``, ``cor_…``, ``key_…``) and per-job event numbers.

Existing rows get random ids and their events are numbered 1, 2, ... per job (in the order
they were written), then the columns become NOT NULL and unique. The ids inside the data of
events written before (``queued``: corpus_id, ``forked``: from_lineage_id / from_job_id,
``result``: the artifact URLs) become the public ones, so that they still lead somewhere.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 12:20:00
"""

from collections.abc import Sequence

import re
from typing import Any

import sqlalchemy as sa
from alembic import op

from service_core.public_ids import API_KEY, COLUMN_LENGTH, CORPUS, JOB, LINEAGE, new_public_id

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = {"api_keys": API_KEY, "corpora": CORPUS, "lineages": LINEAGE, "jobs": JOB}


def _backfill_public_ids(connection: sa.Connection, table: str, prefix: str) -> None:
    ids = connection.execute(sa.text(f"SELECT id FROM {table}")).scalars().all()
    if ids:
        connection.execute(
            sa.text(f"UPDATE {table} SET public_id = :public_id WHERE id = :id"),
            [{"public_id": new_public_id(prefix), "id": row_id} for row_id in ids],
        )


def _number_events(connection: sa.Connection) -> None:
    """seq = the event's rank within its job (by row id); the job keeps the last one."""
    rows = connection.execute(sa.text("SELECT id, job_id FROM job_events ORDER BY job_id, id"))
    numbered: list[dict[str, int]] = []
    last: dict[int, int] = {}
    for event_id, job_id in rows:
        last[job_id] = last.get(job_id, 0) + 1
        numbered.append({"seq": last[job_id], "id": event_id})
    if numbered:
        connection.execute(sa.text("UPDATE job_events SET seq = :seq WHERE id = :id"), numbered)
        connection.execute(
            sa.text("UPDATE jobs SET last_event_seq = :seq WHERE id = :id"),
            [{"seq": seq, "id": job_id} for job_id, seq in last.items()],
        )


_URL = re.compile(r"^/v1/lineages/(\d+)/")
_EVENTS = sa.table("job_events", sa.column("id"), sa.column("type"), sa.column("data", sa.JSON))


def _public_data(data: dict[str, Any], ids: dict[str, dict[int, str]]) -> dict[str, Any]:
    out = dict(data)
    for key, table in (("corpus_id", "corpora"), ("from_lineage_id", "lineages")):
        if isinstance(out.get(key), int) and out[key] in ids[table]:
            out[key] = ids[table][out[key]]
    if isinstance(out.get("from_job_id"), int) and out["from_job_id"] in ids["jobs"]:
        out["from_job_id"] = ids["jobs"][out["from_job_id"]]
    for key in ("checkpoint_url", "importance_url"):
        match = _URL.match(out.get(key) or "") if isinstance(out.get(key), str) else None
        if match and int(match.group(1)) in ids["lineages"]:
            out[key] = f"/v1/lineages/{ids['lineages'][int(match.group(1))]}/" + out[key][
                match.end() :
            ]
    return out


def _rewrite_event_data(connection: sa.Connection) -> None:
    ids = {
        table: dict(connection.execute(sa.text(f"SELECT id, public_id FROM {table}")).all())
        for table in ("corpora", "lineages", "jobs")
    }
    rows = connection.execute(
        sa.select(_EVENTS.c.id, _EVENTS.c.data).where(
            _EVENTS.c.type.in_(("queued", "forked", "result"))
        )
    ).all()
    changed = []
    for event_id, data in rows:
        if isinstance(data, dict) and (new := _public_data(data, ids)) != data:
            changed.append({"event_id": event_id, "new_data": new})
    if changed:
        connection.execute(
            _EVENTS.update()
            .where(_EVENTS.c.id == sa.bindparam("event_id"))
            .values(data=sa.bindparam("new_data", type_=sa.JSON)),
            changed,
        )


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("public_id", sa.String(length=COLUMN_LENGTH), nullable=True)
            )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_event_seq", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=True))

    connection = op.get_bind()
    for table, prefix in TABLES.items():
        _backfill_public_ids(connection, table, prefix)
    _number_events(connection)
    _rewrite_event_data(connection)

    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "public_id", existing_type=sa.String(length=COLUMN_LENGTH), nullable=False
            )
            batch_op.create_index(f"ix_{table}_public_id", ["public_id"], unique=True)
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_job_events_job_seq", ["job_id", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_job_events_job_seq", type_="unique")
        batch_op.drop_column("seq")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("last_event_seq")
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_public_id")
            batch_op.drop_column("public_id")
