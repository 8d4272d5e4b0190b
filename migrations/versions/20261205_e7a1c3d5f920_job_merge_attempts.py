"""job merge attempts: finalize deliveries of a fanned-out job are counted and capped

Revision ID: e7a1c3d5f920
Revises: c41d2e7a9b10
Create Date: 2026-12-05 21:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e7a1c3d5f920"
down_revision: str | None = "c41d2e7a9b10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("merge_attempts", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("merge_attempts")
