"""group scores on results: the m x G group-influence matrix of a job with output.groups

Revision ID: c41d2e7a9b10
Revises: bf5e58f13a49
Create Date: 2026-12-05 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c41d2e7a9b10"
down_revision: str | None = "bf5e58f13a49"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("influence_result", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_scores_uri", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("influence_result", schema=None) as batch_op:
        batch_op.drop_column("group_scores_uri")
