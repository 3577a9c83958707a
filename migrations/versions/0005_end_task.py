"""End-task evaluation: a corpus's purpose, a stage's labelled set, the end-task scores.

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-03 17:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("corpora", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("purpose", sa.String(length=16), nullable=False, server_default="pretraining")
        )
    with op.batch_alter_table("stages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("end_task_corpus_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_stages_end_task_corpus_id_corpora", "corpora", ["end_task_corpus_id"], ["id"]
        )
    op.create_table(
        "end_task_scores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lineage_id", sa.Integer(), nullable=False),
        sa.Column("stage_id", sa.Integer(), nullable=True),
        sa.Column("task_stage_id", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.Column("macro_f1", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["lineage_id"], ["lineages.id"]),
        sa.ForeignKeyConstraint(["stage_id"], ["stages.id"]),
        sa.ForeignKeyConstraint(["task_stage_id"], ["stages.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_end_task_scores_lineage_id", "end_task_scores", ["lineage_id"])


def downgrade() -> None:
    op.drop_index("ix_end_task_scores_lineage_id", table_name="end_task_scores")
    op.drop_table("end_task_scores")
    with op.batch_alter_table("stages", schema=None) as batch_op:
        batch_op.drop_constraint("fk_stages_end_task_corpus_id_corpora", type_="foreignkey")
        batch_op.drop_column("end_task_corpus_id")
    with op.batch_alter_table("corpora", schema=None) as batch_op:
        batch_op.drop_column("purpose")
