"""Opaque public ids (``lin_…``, ``job_…``, ``cor_…``, ``key_…``) and per-job event numbers.

Existing rows get random ids and their events are numbered 1, 2, ... per job (in the order
they were written), then the columns become NOT NULL and unique.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 12:20:00
"""

from collections.abc import Sequence

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
