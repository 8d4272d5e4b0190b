"""Tenant isolation over every route that takes an id: another tenant's resource is a 404, exactly like
an id that does not exist, and nothing the other tenant tries changes it.

Routes come from the app's own route table, so a new route with a path id is covered (or fails
here until it gets a sample request below).
"""

from __future__ import annotations

import re
import uuid

import pytest
import torch

from app.api.openapi import api_routes
from app.main import create_app
from app.settings import Settings
from tests.conftest import WorkerProcess, mint_key
from tests.integration.flows import builtin, register_model, submit, wait

pytestmark = pytest.mark.integration

LINEAR = {"name": "linear", "params": {"in_features": 64, "num_classes": 10}}
OWNED_PARAMS = {"dataset_id", "model_id", "job_id", "checkpoint_id"}
ADMIN_PARAMS = {"tenant_id", "key_id"}


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"1.weight": 0.1 * torch.randn(10, 64, generator=gen), "1.bias": torch.zeros(10)}


# What each mutating route needs so that only the ownership check can refuse it.
def _sample(method: str, path: str) -> dict:
    if path.endswith("/checkpoints") and method == "POST":
        from safetensors.torch import save

        return {"files": {"file": ("c.safetensors", save(_weights(9)))}, "data": {"step": "999"}}
    if method == "PATCH" and path.startswith("/v1/models/"):
        return {"json": {"name": "taken-over"}}
    return {}


@pytest.fixture(scope="module")
def tenant_a(api_server, integration_env, tmp_path_factory):
    """Tenant A's dataset, model (with a checkpoint) and a finished job that kept every artifact."""
    worker = WorkerProcess(integration_env, tmp_path_factory.mktemp("tenancy") / "worker.log").start()
    try:
        with api_server.client() as a:
            train = builtin(a, "sklearn:digits", "train")
            spec = {
                "name": "a-model",
                "architecture": LINEAR,
                "checkpoints": [{"step": 1, "learning_rate": 0.1}],
            }
            model = register_model(a, spec, weights=_weights(0), checkpoints=[_weights(1)])
            assert model.status_code == 201, model.text
            job = submit(
                a,
                {
                    "model_id": model.json()["id"],
                    "train_dataset_id": train["id"],
                    "query_indices": [0, 1],
                    "method": {"name": "tracincp"},
                    "output": {"keep_full_matrix": True, "self_influence": True, "top_k": 3},
                },
            )
            assert job.status_code == 202, job.text
            finished = wait(a, job.headers["location"])
            assert finished["state"] == "succeeded", finished
            trained = register_model(
                a,
                {
                    "name": "a-trained",
                    "architecture": LINEAR,
                    "recipe": {"epochs": 1},
                    "train_dataset_id": train["id"],
                },
            )
            assert trained.status_code == 201, trained.text
            checkpoints = a.get(f"/v1/models/{model.json()['id']}/checkpoints").json()["items"]
            yield {
                "dataset_id": train["id"],
                "model_id": model.json()["id"],
                "checkpoint_id": checkpoints[0]["id"],
                "job_id": finished["id"],
                "training_job_id": trained.json()["training_job_id"],
            }
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def tenant_b(api_server, integration_settings):
    with api_server.client(mint_key(integration_settings, "tenant-b", scopes=("read", "write"))) as b:
        yield b


def _routes_with_ids():
    routes = api_routes(create_app(Settings(), run_sweeper=False).routes)
    for route in routes:
        params = set(re.findall(r"{(\w+)}", route.path))
        if params:
            for method in sorted(route.methods - {"HEAD"}):
                yield method, route.path, params


def test_every_route_with_an_id_hides_other_tenants_resources(api_server, tenant_a, tenant_b):
    covered = 0
    with api_server.client() as a:
        before = {
            name: a.get(f"/v1/{kind}/{tenant_a[name]}").json()
            for name, kind in (
                ("dataset_id", "datasets"),
                ("model_id", "models"),
                ("job_id", "influence-jobs"),
            )
        }
        for method, path, params in _routes_with_ids():
            if params & ADMIN_PARAMS:
                url = path.format(tenant_id=str(uuid.uuid4()), key_id="abc")
                assert tenant_b.request(method, url, **_sample(method, path)).status_code == 403, url
                continue
            assert params <= OWNED_PARAMS, f"{path}: add its path parameters to this test"
            ids = {**tenant_a, "job_id": tenant_a["training_job_id"]} if "training-jobs" in path else tenant_a
            theirs = tenant_b.request(method, path.format(**ids), **_sample(method, path))
            missing = tenant_b.request(
                method, path.format(**{p: str(uuid.uuid4()) for p in params}), **_sample(method, path)
            )
            assert theirs.status_code == 404, (method, path, theirs.text)
            assert theirs.json()["code"] == missing.json()["code"] == "not-found", (method, path)
            assert theirs.json()["title"] == missing.json()["title"], (method, path)
            if method == "GET":  # the owner reaches the same URL (no 'not found' for A)
                mine = a.get(path.format(**ids))
                assert mine.status_code != 404 or mine.json()["code"] != "not-found", (path, mine.text)
            covered += 1
        after = {
            name: a.get(f"/v1/{kind}/{tenant_a[name]}").json()
            for name, kind in (
                ("dataset_id", "datasets"),
                ("model_id", "models"),
                ("job_id", "influence-jobs"),
            )
        }
        assert after == before  # B's PATCH, DELETE, cancel and uploads changed nothing
        assert a.get(f"/v1/influence-jobs/{tenant_a['job_id']}/artifacts/scores").status_code == 200
    assert covered >= 12


def test_lists_and_references_never_reach_other_tenants(tenant_a, tenant_b):
    for kind in ("datasets", "models", "influence-jobs"):
        listed = tenant_b.get(f"/v1/{kind}", params={"page_size": 500}).json()["items"]
        assert not {item["id"] for item in listed} & set(tenant_a.values()), kind
        assert not any(tenant_a["model_id"] in str(item) for item in listed), kind
    body = {
        "model_id": tenant_a["model_id"],
        "train_dataset_id": tenant_a["dataset_id"],
        "method": {"name": "grad_dot"},
    }
    refused = submit(tenant_b, body)
    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/model_id"
    own = builtin(tenant_b, "sklearn:digits", "train")
    refused = submit(tenant_b, {**body, "model_id": tenant_a["model_id"], "train_dataset_id": own["id"]})
    assert refused.status_code == 422, refused.text
    spec = {
        "name": "b",
        "architecture": LINEAR,
        "recipe": {"epochs": 1},
        "train_dataset_id": tenant_a["dataset_id"],
    }
    refused = register_model(tenant_b, spec)
    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/spec/train_dataset_id"


def test_idempotency_keys_are_per_tenant(api_server, tenant_a, tenant_b):
    """The same Idempotency-Key from two tenants makes two jobs; neither sees the other's."""
    own = builtin(tenant_b, "sklearn:digits", "train")
    spec = {"name": "b-model", "architecture": LINEAR}
    model_b = register_model(tenant_b, spec, weights=_weights(3)).json()
    key = f"shared-{uuid.uuid4()}"
    with api_server.client() as a:
        job_a = submit(
            a,
            {
                "model_id": tenant_a["model_id"],
                "train_dataset_id": tenant_a["dataset_id"],
                "query_indices": [0],
                "method": {"name": "grad_dot"},
            },
            **{"Idempotency-Key": key},
        )
    job_b = submit(
        tenant_b,
        {
            "model_id": model_b["id"],
            "train_dataset_id": own["id"],
            "query_indices": [0],
            "method": {"name": "grad_dot"},
        },
        **{"Idempotency-Key": key},
    )
    assert job_a.status_code == job_b.status_code == 202, (job_a.text, job_b.text)
    assert job_a.json()["id"] != job_b.json()["id"]


def test_caches_are_per_tenant(api_server, tenant_a, tenant_b):
    """Identical weights and data in two tenants: each fits its own train state. A shared cache
    entry would tell tenant B (by its cache hit, or its speed) that someone holds the same model."""

    def run_exact(client, query_indices: list[int]) -> dict:
        train = builtin(client, "sklearn:digits", "train")
        model = register_model(client, {"name": "same", "architecture": LINEAR}, weights=_weights(5))
        assert model.status_code == 201, model.text
        body = {
            "model_id": model.json()["id"],
            "train_dataset_id": train["id"],
            "query_indices": query_indices,
            "method": {"name": "if_exact", "params": {"damping": 0.0017}},
        }
        job = wait(client, submit(client, body).headers["location"])
        assert job["state"] == "succeeded", job
        return client.get(f"/v1/influence-jobs/{job['id']}/results").json()["details"]["train_state"]

    with api_server.client() as a:
        first_a = run_exact(a, [0, 1])
        first_b = run_exact(tenant_b, [0, 1])
        again_a = run_exact(a, [2])
    assert first_a["cache_hit"] is False and again_a["cache_hit"] is True
    assert first_b["cache_hit"] is False and first_b["key"] != first_a["key"]
