"""tenant row-level security: a tenant's transactions run as ia_tenant and see only its own rows

Revision ID: b8d2f6a4c1e3
Revises: e7a1c3d5f920
Create Date: 2026-12-06 02:40:00

PostgreSQL only. The tables that carry ``tenant_id`` get a policy that admits a row when
``app.tenant_id`` is unset or empty (the system: workers, sweeper, admin routes) or equals its
``tenant_id``; FORCE makes it bind the tables' owner too. The API runs each authenticated tenant's
transactions as the NOLOGIN role ``ia_tenant`` (no superuser, not the owner, so the policies apply)
with ``app.tenant_id`` set (app/db/session.py): a query that forgot its tenant filter still cannot
read or write another tenant's rows. The role is cluster-wide; it is created if missing and granted
to the migrating user if not yet, which then needs CREATEROLE (the compose and test users are
superusers); a DBA can instead create it and grant it to the service's user beforehand.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "b8d2f6a4c1e3"
down_revision: str | None = "e7a1c3d5f920"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "ia_tenant"
TENANT_TABLES = ("dataset", "model", "job", "api_key")
SCOPE = (
    "coalesce(current_setting('app.tenant_id', true), '') = '' "
    "OR tenant_id = current_setting('app.tenant_id', true)"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
        f"THEN CREATE ROLE {ROLE} NOLOGIN; END IF; "
        f"IF NOT pg_has_role(current_user, '{ROLE}', 'MEMBER') THEN GRANT {ROLE} TO CURRENT_USER; END IF; "
        f"END $$"
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {ROLE}")
    op.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {ROLE}")
    # tables and sequences of later migrations, created by this same user
    op.execute(
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {ROLE}"
    )
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {ROLE}")
    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_scope ON {table} USING ({SCOPE}) WITH CHECK ({SCOPE})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TENANT_TABLES:
        op.execute(f"DROP POLICY IF EXISTS tenant_scope ON {table}")
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM {ROLE}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ROLE}")
    # the role itself stays: it is cluster-wide and other databases may use it
