"""The active-jobs quota under concurrent submissions, on the real PostgreSQL.

Submissions take no lock: a partial unique index on (tenant, quota slot) over queued and running
jobs admits at most ``max_active_jobs``. A burst of concurrent submissions must still admit
exactly the limit, and a job that leaves the active states must free its slot.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sqlalchemy import select

from app.db.models import ACTIVE_STATES, Job, Tenant
from app.db.session import session_scope
from tests.conftest import mint_key
from tests.integration.flows import builtin, register_model

pytestmark = pytest.mark.integration

LIMIT = 5
BURST = 40
LINEAR = {"name": "linear", "params": {"in_features": 30, "num_classes": 2}}


def _active_slots(settings, tenant: str) -> list[int | None]:
    with session_scope(settings) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        return list(
            session.scalars(
                select(Job.quota_slot).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES))
            )
        )


def test_a_concurrent_burst_admits_exactly_the_limit_and_a_finished_job_frees_its_slot(
    api_server, integration_settings
):
    roomy_rate = {"read_requests_per_second": 10_000, "write_requests_per_second": 10_000}
    key = mint_key(integration_settings, "burst", limits={"max_active_jobs": LIMIT, **roomy_rate})
    with api_server.client(key) as client:
        train = builtin(client, "sklearn:breast_cancer", "train")
        weights = {"1.weight": torch.zeros(2, 30), "1.bias": torch.zeros(2)}
        model = register_model(client, {"name": "m", "architecture": LINEAR}, weights=weights)
        assert model.status_code == 201, model.text
    body = {"model_id": model.json()["id"], "train_dataset_id": train["id"], "method": {"name": "grad_dot"}}

    def submit(_: int) -> tuple[int, str]:
        with api_server.client(key) as c:
            response = c.post("/v1/influence-jobs", json=body)
        return response.status_code, response.json().get("id") or response.json()["code"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(submit, range(BURST)))
    accepted = [ident for status, ident in outcomes if status == 202]
    refused = [ident for status, ident in outcomes if status != 202]
    assert len(accepted) == LIMIT, outcomes
    assert set(refused) == {"job-quota-exceeded"}, outcomes
    slots = _active_slots(integration_settings, "burst")
    assert sorted(slots) == list(range(LIMIT))  # every slot held once, none outside the limit

    with api_server.client(key) as client:
        for job_id in accepted[:2]:
            assert client.post(f"/v1/influence-jobs/{job_id}/cancel").json()["state"] == "cancelled"
        assert [client.post("/v1/influence-jobs", json=body).status_code for _ in range(3)] == [202, 202, 429]
    assert sorted(_active_slots(integration_settings, "burst")) == list(range(LIMIT))


def test_the_daily_compute_quota_counts_jobs_and_shards_in_the_last_24_hours(
    api_server, integration_settings
):
    """Two hours of one job and an hour of a fanned-out job's shards within the last 24 hours use a
    three-hour quota: the next submission (and a model to train) get 429 until the tenant's limit is
    raised. Work that ended more than 24 hours ago does not count."""
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import JobShard

    roomy_rate = {"read_requests_per_second": 10_000, "write_requests_per_second": 10_000}
    limits = {"max_compute_seconds_per_day": 3 * 3600, **roomy_rate}
    key = mint_key(integration_settings, "compute-quota", limits=limits)
    with api_server.client(key) as client:
        train = builtin(client, "sklearn:breast_cancer", "train")
        weights = {"1.weight": torch.zeros(2, 30), "1.bias": torch.zeros(2)}
        model = register_model(client, {"name": "m", "architecture": LINEAR}, weights=weights).json()
        body = {"model_id": model["id"], "train_dataset_id": train["id"], "method": {"name": "grad_dot"}}
        ids = [client.post("/v1/influence-jobs", json=body).json()["id"] for _ in range(3)]
        now = utcnow()
        with session_scope(integration_settings) as session:
            whole, fanned, old = (session.get(Job, i) for i in ids)
            whole.state, whole.finished_at = "succeeded", now
            whole.started_at = now - timedelta(hours=2, minutes=1)
            fanned.state, fanned.started_at, fanned.shards_total = "running", now - timedelta(hours=5), 2
            for i in range(2):  # two shards of 30 min each, one of them still running
                session.add(
                    JobShard(
                        job_id=fanned.id, index=i, train_lo=i, train_hi=i + 1, state="succeeded",
                        started_at=now - timedelta(minutes=30), finished_at=None if i else now,
                    )
                )  # fmt: skip
            old.state, old.started_at = "succeeded", now - timedelta(hours=40)
            old.finished_at = now - timedelta(hours=30)
        me = client.get("/v1/me").json()
        assert me["tenant"]["effective_limits"]["max_compute_seconds_per_day"] == 3 * 3600
        assert 3 * 3600 <= me["compute_seconds_last_24h"] < 3 * 3600 + 300, me
        refused = client.post("/v1/influence-jobs", json=body)
        assert refused.status_code == 429 and refused.json()["code"] == "compute-quota-exceeded", refused.text
        assert int(refused.headers["retry-after"]) > 0
        recipe = {"optimizer": "sgd", "learning_rate": 0.1, "epochs": 1}
        spec = {"name": "t", "architecture": LINEAR, "recipe": recipe, "train_dataset_id": train["id"]}
        trained = register_model(client, spec)
        assert trained.status_code == 429 and trained.json()["code"] == "compute-quota-exceeded"
    with session_scope(integration_settings) as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == "compute-quota"))
        tenant.limits = {**tenant.limits, "max_compute_seconds_per_day": 4 * 3600}
    with api_server.client(key) as client:
        deadline = time.monotonic() + 3 * integration_settings.auth_cache_seconds + 5
        while (response := client.post("/v1/influence-jobs", json=body)).status_code == 429:
            assert time.monotonic() < deadline, "the raised limit never applied"  # keys are cached a while
            time.sleep(0.5)
        assert response.status_code == 202, response.text
        for job in client.get("/v1/influence-jobs", params={"state": "queued"}).json()["items"]:
            client.post(f"/v1/influence-jobs/{job['id']}/cancel")
