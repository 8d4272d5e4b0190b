"""A worker's pooled PostgreSQL connection closed by the server (failover, restart, pg_terminate_backend)
between two uses: the job's reads and cache writes retry on a new connection instead of failing the job
with internal-error (the race tests/integration/test_chaos.py hits now and then)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from app.db.session import get_engine, session_scope
from app.estimators import get_estimator
from app.services import train_state
from app.settings import Settings
from app.storage.artifacts import ArtifactStore

pytestmark = pytest.mark.integration


def _drop_pooled_connection(settings: Settings, admin_url: str) -> None:
    """Use the pool's connection a moment ago (so no idle pre-ping), then have the server close it."""
    with session_scope(settings) as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            # waits for the backend to exit: by default it only signals it, and a query that slips in
            # before the exit succeeds, leaving the test's next use to meet the dead connection
            assert conn.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}).scalar()
    finally:
        admin.dispose()


def test_train_state_cache_survives_a_dropped_connection(pg_url, tmp_path):
    settings = Settings(database_url=pg_url, data_dir=tmp_path)
    # pg_url's pool may hold connections of earlier tests; checkout is first-in first-out, so with more
    # than one the next step could take a live one. Emptied, it holds one: the one just dropped.
    get_engine(settings).dispose()
    store = ArtifactStore(settings.resolved_artifact_dir)
    estimator = get_estimator("if_exact")
    params = estimator.Params()
    inputs = {"tenant_id": "t", "weights_sha256": "w", "train_dataset_sha256": "d"}
    stored = store.put_npz(cholesky=np.eye(3))
    key, described = train_state.state_key(estimator, params, inputs)

    _drop_pooled_connection(settings, pg_url)
    train_state.record(settings, key, estimator.name, stored, 1.5, described)
    _drop_pooled_connection(settings, pg_url)
    found = train_state.lookup(settings, store, estimator, params, inputs)
    assert found.uri == stored.uri and found.fit_seconds == 1.5
