"""One engine per process, built from settings; short sessions everywhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)
RETRY_SECONDS = 60.0  # a restart or failover; past this the lease has expired and the job re-runs anyway


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL lets the worker write while the API reads
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # A bounded connect: a database that hangs must fail a request (503), not pin its thread.
    # A pool as large as the API's burst concurrency: overflow connections are closed on check-in,
    # and opening one costs PostgreSQL a backend process.
    engine = create_engine(
        url, pool_size=20, max_overflow=10, pool_recycle=1800, connect_args={"connect_timeout": 5}
    )
    event.listen(engine, "checkin", _stamp_idle)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


PING_IF_IDLE_SECONDS = 10.0


def _stamp_idle(_dbapi_conn, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
    """Pre-ping only connections idle for a while (a busy pool would pay a round trip per request).

    A connection that dies while in use fails its request once (503); SQLAlchemy then sees the
    disconnect and invalidates every older connection of the pool, so the next request reconnects.
    """
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_IF_IDLE_SECONDS:
        return
    try:
        dbapi_conn.execute("SELECT 1")
        dbapi_conn.rollback()
    except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
        raise DisconnectionError(str(exc)) from exc


# --- tenant scope: PostgreSQL row-level security as a second line behind the services' filters -------

TENANT_ROLE = "ia_tenant"
"""The role a tenant's transactions run as: no superuser, not the tables' owner, so the row-level
security policies of the tenant-owned tables (migration ``b8d2f6a4c1e3``) apply to it."""
_tenant_scope: ContextVar[str | None] = ContextVar("tenant_scope", default=None)


@contextmanager
def tenant_scope(tenant_id: str | None) -> Iterator[None]:
    """Sessions begun inside see and write only ``tenant_id``'s rows (None: the unscoped system view)."""
    token = _tenant_scope.set(tenant_id)
    try:
        yield
    finally:
        _tenant_scope.reset(token)


def leave_tenant_scope() -> None:
    """Unscoped from here to the end of the current context (an admin route manages every tenant)."""
    _tenant_scope.set(None)


@event.listens_for(Session, "after_begin")
def _apply_tenant_scope(_session: Session, _transaction, connection: Connection) -> None:
    """Put each PostgreSQL transaction in the current tenant scope.

    A transaction takes the scope with ``SET LOCAL`` (gone at its end). An autocommit session has no
    transaction to hold it, so it sets the connection's own role and ``app.tenant_id``, remembered in
    ``connection.info`` (cleared on reconnect) so a pool connection already in that scope costs no
    round trip; a later transaction in another scope overrides them locally.
    """
    if connection.dialect.name != "postgresql":
        return
    wanted = _tenant_scope.get() or ""
    held = connection.info.get("tenant_scope", "")
    if wanted == held:
        return
    autocommit = connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    connection.exec_driver_sql(  # one round trip: the "role" setting is SET ROLE
        "SELECT set_config('role', %s, %s), set_config('app.tenant_id', %s, %s)",
        (TENANT_ROLE if wanted else "none", not autocommit, wanted, not autocommit),
    )
    if autocommit:
        connection.info["tenant_scope"] = wanted


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=8)
def _autocommit_engine(url: str) -> Engine:
    return _engine_for(url).execution_options(isolation_level="AUTOCOMMIT")  # same pool


def get_engine(settings: Settings) -> Engine:
    return _engine_for(settings.resolved_database_url)


def get_sessionmaker(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(get_engine(settings), expire_on_commit=False)


@contextmanager
def autocommit_session(settings: Settings) -> Iterator[Session]:
    """A session without a transaction: no BEGIN, COMMIT or ROLLBACK round trips.

    Each statement sees the latest committed data and commits by itself; use it for single-query
    reads such as a poll, or for work whose only write is one statement.
    """
    session = Session(_autocommit_engine(settings.resolved_database_url), expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """Commit on success, roll back on error: the unit of work for worker and CLI code."""
    session = get_sessionmaker(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _unreachable(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (restart, failover, network)."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def retry_transaction(settings: Settings, work: Callable[[Session], T]) -> T:
    """Run ``work`` in its own transaction, again with backoff while the database is unreachable.

    For the commits that save minutes of compute: a PostgreSQL restart takes seconds. ``work``
    must re-read what it needs and write through compare-and-set guards, so a retry after a
    commit whose acknowledgement was lost changes nothing.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            with session_scope(settings) as session:
                return work(session)
        except DBAPIError as exc:
            if not _unreachable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.2fs", type(exc.orig).__name__, delay)
        time.sleep(delay)
        delay = min(2 * delay, 2.0)
