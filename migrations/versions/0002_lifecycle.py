"""Lifecycle: soft deletion of corpora and lineages, and a lineage's fork origin.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 17:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("corpora", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("lineages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("forked_from_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("forked_from_position", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("files_removed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_foreign_key(
            "fk_lineages_forked_from_id_lineages", "lineages", ["forked_from_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("lineages", schema=None) as batch_op:
        batch_op.drop_constraint("fk_lineages_forked_from_id_lineages", type_="foreignkey")
        batch_op.drop_column("files_removed_at")
        batch_op.drop_column("deleted_at")
        batch_op.drop_column("forked_from_position")
        batch_op.drop_column("forked_from_id")

    with op.batch_alter_table("corpora", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
