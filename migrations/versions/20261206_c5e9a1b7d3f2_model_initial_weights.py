"""model initial weights: service-side training (and retraining) may start from uploaded weights

Revision ID: c5e9a1b7d3f2
Revises: b8d2f6a4c1e3
Create Date: 2026-12-06 02:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c5e9a1b7d3f2"
down_revision: str | None = "b8d2f6a4c1e3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.add_column(sa.Column("initial_weights_uri", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("initial_weights_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model", schema=None) as batch_op:
        batch_op.drop_column("initial_weights_sha256")
        batch_op.drop_column("initial_weights_uri")
