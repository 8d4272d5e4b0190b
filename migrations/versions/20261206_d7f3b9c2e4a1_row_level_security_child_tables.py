"""row-level security on the tables owned through a parent: checkpoints (model), results and shards (job)

Revision ID: d7f3b9c2e4a1
Revises: c5e9a1b7d3f2
Create Date: 2026-12-06 03:05:00

PostgreSQL only. A row is visible to a tenant's transaction when its parent row is: the policy's
sub-select on ``model`` / ``job`` runs under those tables' own policies (b8d2f6a4c1e3). The system
(``app.tenant_id`` unset or empty) sees every row, as before.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "d7f3b9c2e4a1"
down_revision: str | None = "c5e9a1b7d3f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHILDREN = {  # table: (parent table, foreign key column)
    "checkpoint": ("model", "model_id"),
    "influence_result": ("job", "job_id"),
    "query_result": ("job", "job_id"),
    "job_shard": ("job", "job_id"),
}
SYSTEM = "coalesce(current_setting('app.tenant_id', true), '') = ''"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (parent, column) in CHILDREN.items():
        scope = f"{SYSTEM} OR EXISTS (SELECT 1 FROM {parent} p WHERE p.id = {table}.{column})"
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_scope ON {table} USING ({scope}) WITH CHECK ({scope})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in CHILDREN:
        op.execute(f"DROP POLICY IF EXISTS tenant_scope ON {table}")
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
