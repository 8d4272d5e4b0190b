"""shard details: a row shard's estimator metadata and score standard errors reach the merge

Revision ID: e4b8d2f6a0c3
Revises: d7f3b9c2e4a1
Create Date: 2026-12-06 20:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e4b8d2f6a0c3"
down_revision: str | None = "d7f3b9c2e4a1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_shard", schema=None) as batch_op:
        batch_op.add_column(sa.Column("details", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("scores_stderr_uri", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_shard", schema=None) as batch_op:
        batch_op.drop_column("scores_stderr_uri")
        batch_op.drop_column("details")
