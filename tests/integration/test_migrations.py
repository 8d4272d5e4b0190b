"""Alembic upgrade -> downgrade -> upgrade on PostgreSQL and on SQLite; the schema matches the ORM."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.db.base import Base
from app.db.migrate import downgrade, upgrade
from tests.conftest import PG_ADMIN_URL

pytestmark = pytest.mark.integration
TABLES = {"dataset", "model", "checkpoint", "job", "influence_result", "query_result"}


def _roundtrip(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert TABLES <= set(inspect(conn).get_table_names())
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"migrations and ORM disagree: {diff}"
    downgrade(url)
    with engine.connect() as conn:
        assert not TABLES & set(inspect(conn).get_table_names())
    upgrade(url)
    with engine.connect() as conn:
        assert TABLES <= set(inspect(conn).get_table_names())
    engine.dispose()


def test_sqlite(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgres():
    name = f"ia_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        _roundtrip(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
