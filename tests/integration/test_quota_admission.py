"""The active-jobs quota under concurrent submissions, on the real PostgreSQL.

Submissions take no lock: a partial unique index on (tenant, quota slot) over queued and running
jobs admits at most ``max_active_jobs``. A burst of concurrent submissions must still admit
exactly the limit, and a job that leaves the active states must free its slot.
"""

from __future__ import annotations

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
