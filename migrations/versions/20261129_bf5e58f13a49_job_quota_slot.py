"""job quota slot: the active-jobs quota enforced by a partial unique index instead of a tenant lock

Revision ID: bf5e58f13a49
Revises: 1681329cae36
Create Date: 2026-11-29 02:56:59.715065
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "bf5e58f13a49"
down_revision: str | None = "1681329cae36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quota_slot", sa.Integer(), nullable=True))
        batch_op.create_index(
            "uq_job_active_quota_slot",
            ["tenant_id", "quota_slot"],
            unique=True,
            postgresql_where=ACTIVE,
            sqlite_where=ACTIVE,
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("uq_job_active_quota_slot", postgresql_where=ACTIVE, sqlite_where=ACTIVE)
        batch_op.drop_column("quota_slot")
