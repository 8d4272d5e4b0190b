"""PostgreSQL row-level security behind the services' tenant filters (RELIABILITY.md 3, API1): a
tenant's transactions run as ia_tenant with app.tenant_id set, so a query that forgot its filter
still neither reads nor writes another tenant's rows; the system's sessions see everything."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from app.api import auth
from app.db.models import Checkpoint, Dataset, InfluenceResult, Job, JobShard, Model, QueryResult, Tenant
from app.db.session import tenant_scope
from app.main import create_app
from app.problems import ProblemError
from app.services import datasets as datasets_service
from tests.conftest import mint_key

pytestmark = pytest.mark.integration


def _dataset(tenant_id: str) -> Dataset:
    return Dataset(
        tenant_id=tenant_id,
        name="d",
        source="builtin",
        format="npz",
        n_examples=1,
        feature_shape=[1],
        label_kind="int",
        uri=f"x/{uuid.uuid4().hex}",
        sha256="0" * 64,
        size_bytes=1,
    )


@pytest.fixture(scope="module")
def two_tenants(pg_url):
    """Tenants a and b with one dataset each, on an engine with one connection (so scopes meet on it)."""
    engine = create_engine(pg_url, pool_size=1, max_overflow=0)
    a, b = (Tenant(name=f"rls-{n}-{uuid.uuid4().hex[:6]}") for n in "ab")
    with Session(engine) as session:
        session.add_all([a, b])
        session.flush()
        rows = _dataset(a.id), _dataset(b.id)
        session.add_all(rows)
        session.commit()
        ids = a.id, b.id, rows[0].id, rows[1].id
    yield engine, ids
    engine.dispose()


def _visible(session: Session, *ids: str) -> set[str]:
    return set(session.scalars(select(Dataset.id).where(Dataset.id.in_(ids))))


def test_a_tenant_transaction_sees_and_writes_only_its_rows(two_tenants):
    engine, (a, b, da, db) = two_tenants
    with tenant_scope(a), Session(engine) as session:
        assert _visible(session, da, db) == {da}
        assert session.get(Dataset, db) is None  # an unfiltered lookup by id
        moved = session.execute(update(Dataset).where(Dataset.id == db).values(name="taken")).rowcount
        assert moved == 0
        assert session.scalar(select(func.current_user())) == "ia_tenant"
        session.rollback()
        session.add(_dataset(b))  # a row for another tenant
        with pytest.raises(ProgrammingError, match="row-level security"):
            session.flush()
    with Session(engine) as session:  # the system view: workers, sweeper, admin routes
        assert _visible(session, da, db) == {da, db}
        assert session.get(Dataset, db).name == "d"
        assert session.scalar(select(func.current_user())) != "ia_tenant"


def test_scopes_never_leak_through_a_pooled_connection(two_tenants):
    """Autocommit sessions hold the scope on the connection; the next session on it, in any scope or
    mode, sees exactly its own view."""
    engine, (a, b, da, db) = two_tenants
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with tenant_scope(a), Session(autocommit) as session:
        assert _visible(session, da, db) == {da}
    with Session(engine) as session:  # a transaction of the system on the same connection
        assert _visible(session, da, db) == {da, db}
    with tenant_scope(b), Session(engine) as session:
        assert _visible(session, da, db) == {db}
    with tenant_scope(a), Session(autocommit) as session:  # the connection still holds a: no round trip
        assert _visible(session, da, db) == {da}
    with Session(autocommit) as session:
        assert _visible(session, da, db) == {da, db}
    with tenant_scope(b), Session(autocommit) as session:
        assert _visible(session, da, db) == {db}


def test_rows_owned_through_a_parent_follow_it(two_tenants):
    """Checkpoints (through their model) and results, query rows and shards (through their job)."""
    engine, (a, b, da, _db) = two_tenants
    with Session(engine) as session:  # tenant a's model with a checkpoint, and a finished job
        model = Model(
            tenant_id=a,
            name="m",
            architecture="linear",
            architecture_params={},
            task="classification",
            loss="cross_entropy",
            recipe={},
            state="ready",
            n_parameters=1,
        )
        session.add(model)
        session.flush()
        job = Job(tenant_id=a, kind="influence", model_id=model.id, train_dataset_id=da, spec={})
        session.add_all([Checkpoint(model_id=model.id, step=1, uri="x", sha256="0" * 64), job])
        session.flush()
        session.add(InfluenceResult(job_id=job.id, attempt=1, n_queries=1, n_train=1))
        session.add(QueryResult(job_id=job.id, query_index=0, query_row=0, proponents=[], opponents=[]))
        session.add(JobShard(job_id=job.id, index=0, train_lo=0, train_hi=1))
        session.commit()
        model_id, job_id = model.id, job.id
    tables = {
        Checkpoint: Checkpoint.model_id == model_id,
        InfluenceResult: InfluenceResult.job_id == job_id,
        QueryResult: QueryResult.job_id == job_id,
        JobShard: JobShard.job_id == job_id,
    }

    def counts(session: Session) -> dict[str, int]:
        return {
            t.__name__: session.scalar(select(func.count()).select_from(t).where(w))
            for t, w in tables.items()
        }

    with tenant_scope(b), Session(engine) as session:
        assert set(counts(session).values()) == {0}
        session.add(Checkpoint(model_id=model_id, step=2, uri="y", sha256="1" * 64))  # onto a's model
        with pytest.raises(ProgrammingError, match="row-level security"):
            session.flush()
    for scope in (a, None):
        with tenant_scope(scope), Session(engine) as session:
            assert set(counts(session).values()) == {1}


def test_a_route_that_forgot_its_filter_still_answers_404(integration_settings, monkeypatch):
    """A BOLA bug planted in the dataset lookup: the API's tenant scope still hides tenant a's dataset
    from tenant b, while the admin routes keep the system view."""
    app = create_app(integration_settings, run_sweeper=False)
    a_key = mint_key(integration_settings, f"rls-api-a-{uuid.uuid4().hex[:6]}")
    b_key = mint_key(integration_settings, f"rls-api-b-{uuid.uuid4().hex[:6]}")

    def unfiltered_get(session, tenant_id, dataset_id):
        row = session.get(Dataset, dataset_id)
        if row is None:
            raise ProblemError(404, "not-found", "Dataset not found", f"no dataset {dataset_id}")
        return row

    with TestClient(app) as http:
        a = {"Authorization": f"Bearer {a_key}"}
        b = {"Authorization": f"Bearer {b_key}"}
        created = http.post("/v1/datasets/builtin", headers=a, json={"builtin": "sklearn:digits"})
        assert created.status_code == 201, created.text
        dataset = created.json()["id"]
        monkeypatch.setattr(datasets_service, "get", unfiltered_get)
        assert http.get(f"/v1/datasets/{dataset}", headers=a).status_code == 200
        stolen = http.get(f"/v1/datasets/{dataset}", headers=b)
        assert stolen.status_code == 404, stolen.text
        # the planted bug is real: without the scope, b reads a's dataset
        monkeypatch.setattr(auth, "tenant_scope", lambda tenant_id: contextlib.nullcontext())
        assert http.get(f"/v1/datasets/{dataset}", headers=b).status_code == 200
        # an admin route manages another tenant's keys: unscoped
        a_tenant = http.get("/v1/me", headers=a).json()["tenant"]["id"]
        keys = http.get(f"/v1/tenants/{a_tenant}/api-keys", headers=b)
        assert keys.status_code == 200 and len(keys.json()) == 1
