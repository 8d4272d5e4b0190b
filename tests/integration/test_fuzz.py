"""Schemathesis fuzzes every operation of the OpenAPI document on the real API process, as two tenants.

Phase 1 runs ``st run`` (the CLI, so its coverage, fuzzing and stateful phases and the two-identity
``object_level_authorization`` check run as they would by hand) as tenant A: any 5xx, any status,
content type, header or body the document does not declare, any invalid request accepted, any
request served without a valid key, or any answer slower than ``MAX_RESPONSE_SECONDS`` fails.
Phase 2 replays, with tenant B's key, every operation that takes a path id against every dataset,
model and job A holds after fuzzing: 404 (403 on the admin routes), and A's objects stay as they were.

A and B are tenants of their own, so what the fuzzer creates (models in training, queued jobs) never
counts against the quotas of the session's other tenants. A holds the admin scope, and an admin may
lock any tenant out, so the operations that change a tenant (limits, key revocation) are pinned to a
throwaway tenant, and the test checks that no other tenant was touched.

The regression tests below pin what the fuzzer found, each in a request or two.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_tensors
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, Tenant
from app.db.session import session_scope
from app.main import create_app
from tests.conftest import ServerProcess, mint_key
from tests.integration.flows import assert_problem, builtin, register_model, submit

pytestmark = pytest.mark.integration

SEED = 20260527
MAX_EXAMPLES = 15  # per operation and phase: about 45 s of fuzzing on two cores
MAX_RESPONSE_SECONDS = 10
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
)
# Off: a schema-valid request may still be refused on meaning (an id that does not exist, an
# architecture that cannot take these parameters), so "valid data is accepted" does not hold here.
OFF_CHECKS = ("positive_data_acceptance",)
GENEROUS = {
    "read_requests_per_second": 100_000,
    "write_requests_per_second": 100_000,
    "max_active_jobs": 1000,
}
LINEAR = {"name": "linear", "params": {"in_features": 30, "num_classes": 2}}
OWNED = {"dataset_id": "datasets", "model_id": "models", "job_id": "jobs", "checkpoint_id": "checkpoints"}


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {"1.weight": torch.full((2, 30), scale), "1.bias": torch.zeros(2)}


def _seed(client: httpx.Client) -> dict[str, list[str]]:
    """One of everything, so the fuzzer and the cross-tenant replay reach real objects."""
    dataset = builtin(client, "sklearn:breast_cancer")
    spec = {"name": "fuzz-linear", "architecture": LINEAR, "checkpoints": [{"step": 1}]}
    model = register_model(client, spec, weights=_weights(0.0), checkpoints=[_weights(0.1)])
    assert model.status_code == 201, model.text
    job = submit(
        client,
        {"model_id": model.json()["id"], "train_dataset_id": dataset["id"], "method": {"name": "grad_dot"}},
    )
    assert job.status_code == 202, job.text
    spec = {
        "name": "fuzz-trained",
        "architecture": LINEAR,
        "recipe": {"epochs": 1},
        "train_dataset_id": dataset["id"],
    }
    trained = register_model(client, spec)
    assert trained.status_code == 201, trained.text
    return {
        "datasets": [dataset["id"]],
        "models": [model.json()["id"], trained.json()["id"]],
        "jobs": [job.json()["id"], trained.json()["training_job_id"]],
    }


def _all(client: httpx.Client, path: str) -> list[dict]:
    items, token = [], None
    while True:
        page = client.get(path, params={"page_size": 100, **({"page_token": token} if token else {})})
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        token = page.json().get("next_page_token")
        if not token:
            return items


def _holdings(client: httpx.Client) -> dict[str, dict[str, dict]]:
    """The caller tenant's datasets, models, checkpoints and jobs by id (training jobs via their models)."""
    models = {m["id"]: m for m in _all(client, "/v1/models")}
    jobs = {j["id"]: j for j in _all(client, "/v1/influence-jobs")}
    for model in models.values():
        if model["training_job_id"]:
            jobs[model["training_job_id"]] = client.get(
                f"/v1/training-jobs/{model['training_job_id']}"
            ).json()
    checkpoints = {c["id"]: c for m in models for c in _all(client, f"/v1/models/{m}/checkpoints")}
    return {
        "datasets": {d["id"]: d for d in _all(client, "/v1/datasets")},
        "models": models,
        "jobs": jobs,
        "checkpoints": checkpoints,
    }


def _fingerprint(holdings: dict[str, dict[str, dict]]) -> dict[str, dict[str, tuple]]:
    """What B could have changed: existence, names, states, checkpoints, cancellation."""
    fields = ("name", "state", "n_checkpoints", "cancel_requested_at", "sha256")
    return {
        kind: {i: tuple(o.get(f) for f in fields) for i, o in objs.items()} for kind, objs in holdings.items()
    }


def _revoked(client: httpx.Client, tenants) -> dict[str, str | None]:
    """revoked_at of every key of these tenants (keys the fuzzer mints for them are harmless)."""
    keys = [k for tenant in tenants for k in client.get(f"/v1/tenants/{tenant}/api-keys").json()]
    return {k["key_id"]: k["revoked_at"] for k in keys}


def _config(tmp_path, a_key: str, b_key: str, pinned_tenant: str, seeded: dict[str, list[str]]) -> str:
    """schemathesis.toml: A fuzzes, B is A's peer, tenant-changing operations hit the pinned tenant.

    Seeded ids stand in for some generated ones, so job submission and the job routes get past 404.
    """
    auth = [
        {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}]}
        for name, key in (("tenant-a", a_key), ("tenant-b", b_key))
    ]
    (tmp_path / "wfc.json").write_text(json.dumps({"auth": auth}))
    checks = [f"{name}.enabled = true" for name in CHECKS] + [
        f"{name}.enabled = false" for name in OFF_CHECKS
    ]
    trains = {
        "name": "fuzz-spec",
        "architecture": LINEAR,
        "recipe": {"epochs": 1},
        "train_dataset_id": seeded["datasets"][0],
    }
    values = {**seeded, "estimators": ["grad_dot", "tracincp", "representer"], "specs": [json.dumps(trains)]}
    dictionaries = [f"{kind} = {{ values = {json.dumps(v)} }}" for kind, v in values.items()]
    bindings = [
        f'"{where}" = {{ dictionary = "{kind}", probability = 0.5 }}'
        for where, kind in (
            ("body.model_id", "models"),
            ("body.train_dataset_id", "datasets"),
            ("body.query_dataset_id", "datasets"),
            ("body.method.name", "estimators"),
            ("body.spec", "specs"),
            ("path.dataset_id", "datasets"),
            ("path.model_id", "models"),
            ("path.job_id", "jobs"),
        )
    ]
    newline = "\n"
    return f"""
seed = {SEED}
workers = 1
request-timeout = 60

[generation]
max-examples = {MAX_EXAMPLES}
database = "none"

[checks]
{newline.join(checks)}
max_response_time = {MAX_RESPONSE_SECONDS}

[auth.wfc]
path = "{tmp_path / "wfc.json"}"
user = "tenant-a"
peers = ["tenant-a", "tenant-b"]

[dictionaries]
{newline.join(dictionaries)}

[parameters]
{newline.join(bindings)}

[[operations]]
include-path-regex = '^/v1/tenants/\\{{tenant_id\\}}'
include-method = ["PATCH", "DELETE"]
parameters = {{ tenant_id = "{pinned_tenant}" }}
"""


def _schemathesis(url: str, tmp_path, config: str) -> tuple[subprocess.CompletedProcess, dict]:
    (tmp_path / "schemathesis.toml").write_text(config)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml")),
            *("run", f"{url}/openapi.json", "--no-color"),
            *("--report", "json", "--report-json-path", str(report)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return run, json.loads(report.read_text())


def _request(b: httpx.Client, method: str, path: str) -> httpx.Response:
    """B's request, valid in every way but ownership, so only the tenant check can refuse it."""
    if method == "POST" and path.endswith("/checkpoints"):
        files = {"file": ("c.safetensors", save_tensors(_weights(0.2)), "application/octet-stream")}
        return b.post(path, files=files, data={"step": "7"})
    if method == "PATCH" and path.startswith("/v1/models/"):
        return b.patch(path, json={"name": "taken-over"})
    if method == "PATCH" and path.startswith("/v1/tenants/"):
        return b.patch(path, json={"limits": {"read_requests_per_second": 1}})
    if method == "POST" and path.endswith("/api-keys"):
        return b.post(path, json={"name": "stolen", "scopes": ["admin"]})
    return b.request(method, path)


def _replay_as_other_tenant(b: httpx.Client, spec: dict, held: dict, a_tenant: str, a_key_id: str) -> int:
    """Every operation with a path id, for every object A holds: B gets 404 (403 on admin routes)."""
    replayed = 0
    for path, methods in spec["paths"].items():
        params = set(re.findall(r"{(\w+)}", path))
        if not params:
            continue
        for method in [m.upper() for m in methods]:
            if params & {"tenant_id", "key_id"}:
                response = _request(b, method, path.format(tenant_id=a_tenant, key_id=a_key_id))
                assert_problem(response, 403, "insufficient-scope")
                replayed += 1
                continue
            assert params <= OWNED.keys(), f"{path}: teach this test about {params - OWNED.keys()}"
            # The innermost id names the object; a checkpoint's URL also needs its model's id.
            kind = OWNED[re.findall(r"{(\w+)}", path)[-1]]
            for object_id, obj in held[kind].items():
                if kind == "jobs" and ("/training-jobs/" in path) != (obj["kind"] == "training"):
                    continue
                ids = {"model_id": obj["model_id"]} if kind == "checkpoints" else {}
                response = _request(b, method, path.format(**{**dict.fromkeys(params, object_id), **ids}))
                assert_problem(response, 404, "not-found")
                replayed += 1
    return replayed


@pytest.fixture(scope="module")
def fuzz_server(integration_env, integration_settings, tmp_path_factory):
    """An API process of the session's stack whose jobs go to a queue no worker reads.

    The fuzzer submits dozens of jobs; on the session queue they would keep the other modules'
    workers busy for minutes. Afterwards they are cancelled, so no sweeper re-publishes them.
    """
    env = {
        **integration_env,
        "IA_COMPUTE_QUEUE": f"fuzz-unread-{uuid.uuid4().hex[:6]}",
        "IA_SWEEP_INTERVAL_SECONDS": "0",
    }
    server = ServerProcess(env, tmp_path_factory.mktemp("fuzz") / "api.log", "--no-worker").wait_ready()
    yield server
    server.stop()
    with session_scope(integration_settings) as session:
        fuzz_tenants = select(Tenant.id).where(Tenant.name.like("tenant-fuzz-%"))
        session.execute(
            update(Job)
            .where(Job.tenant_id.in_(fuzz_tenants), Job.state.in_(("queued", "running")))
            .values(state="cancelled", finished_at=utcnow())
        )


def test_fuzzing_two_tenants_finds_no_error_no_contract_breach_and_no_cross_tenant_access(
    fuzz_server, integration_settings, tmp_path
):
    api_server = fuzz_server
    a_key = mint_key(integration_settings, "tenant-fuzz-a")
    b_key = mint_key(integration_settings, "tenant-fuzz-b", scopes=("read", "write"))
    spec = httpx.get(f"{api_server.url}/openapi.json").json()
    with api_server.client(a_key) as a, api_server.client(b_key) as b:
        a_tenant = a.get("/v1/me").json()["tenant"]["id"]
        b_tenant = b.get("/v1/me").json()["tenant"]["id"]
        pinned = a.post("/v1/tenants", json={"name": "tenant-fuzz-pinned"}).json()["id"]
        for tenant in (a_tenant, b_tenant):
            assert a.patch(f"/v1/tenants/{tenant}", json={"limits": GENEROUS}).status_code == 200
        others = {t["id"]: t for t in _all(a, "/v1/tenants") if t["id"] != pinned}
        revoked_before = _revoked(a, others)
        seeded = _seed(a)

        run, report = _schemathesis(api_server.url, tmp_path, _config(tmp_path, a_key, b_key, pinned, seeded))
        assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
        operations = sum(len(methods) for methods in spec["paths"].values())
        assert report["operations"]["total"] == report["operations"]["tested"] == operations, report
        phases = {name: phase["status"] for name, phase in report["phases"].items()}
        assert phases == {
            "examples": "skip",
            "coverage": "success",
            "fuzzing": "success",
            "stateful": "success",
        }
        assert report["test_cases"]["generated"] >= 30 * operations, report["test_cases"]
        assert {t["id"]: t for t in _all(a, "/v1/tenants") if t["id"] in others} == others
        revoked = _revoked(a, others)
        assert {k: revoked[k] for k in revoked_before} == revoked_before, "a key outside the pinned tenant"

        _seed(a)  # the fuzzer may have cancelled or deleted the first ones: B must meet live objects too
        held = _holdings(a)
        assert all(held.values()), {kind: len(ids) for kind, ids in held.items()}
        replayed = _replay_as_other_tenant(b, spec, held, a_tenant, a_key.split("_")[1])
        assert replayed >= sum(len(ids) for ids in held.values()), replayed
        for listing in ("/v1/datasets", "/v1/models", "/v1/influence-jobs"):
            assert not {item["id"] for item in _all(b, listing)} & set().union(*held.values()), listing
        assert _fingerprint(_holdings(a)) == _fingerprint(held), "tenant B changed something of tenant A's"


# --- what the fuzzer found ----------------------------------------------------------------------


def test_values_the_database_cannot_store_are_422_not_500(client):
    """NUL in an id, a filter or a name reached PostgreSQL, which refuses it: 500 before."""
    for path in ("/v1/models/a%00b", "/v1/datasets/a%00b", "/v1/influence-jobs?model_id=a%00b"):
        assert_problem(client.get(path), 422, "unstorable-value")
    named = client.post("/v1/datasets/builtin", json={"builtin": "sklearn:digits", "name": "a\u0000b"})
    assert_problem(named, 422, "unstorable-value")


def test_a_builtin_split_too_small_for_every_class_is_422_not_500(client):
    for fraction in (1e-9, 0.999):
        body = {"builtin": "sklearn:digits", "split": "test", "test_fraction": fraction}
        problem = assert_problem(client.post("/v1/datasets/builtin", json=body), 422, "invalid-request")
        assert problem["errors"][0]["pointer"] == "/test_fraction"


def test_bodies_are_read_as_strictly_as_the_document_says(client):
    """Lax parsing took false for the integer 0, 0 for false and 0 for 1970-01-01 (an expired key)."""
    for body in ({"seed": False}, {"standardize": 0}, {"test_fraction": "0.5"}, {"seed": 2**32}):
        response = client.post("/v1/datasets/builtin", json={"builtin": "sklearn:digits", **body})
        assert_problem(response, 422, "invalid-request")
    tenant = client.get("/v1/me").json()["tenant"]["id"]
    key = client.post(
        f"/v1/tenants/{tenant}/api-keys", json={"name": "k", "scopes": ["read"], "expires_at": 0}
    )
    assert_problem(key, 422, "invalid-request")
    later = {"name": "k", "scopes": ["read"], "expires_at": "2099-01-01T00:00:00Z"}
    assert client.post(f"/v1/tenants/{tenant}/api-keys", json=later).status_code == 201


def test_405_allows_every_method_of_the_path(client):
    """Starlette named only the first route's methods (GET on /v1/tenants/{id}, which also takes PATCH)."""
    tenant = client.get("/v1/me").json()["tenant"]["id"]
    for path, allow in (
        (f"/v1/tenants/{tenant}", "GET, PATCH"),
        ("/v1/models/x", "DELETE, GET, PATCH"),
        ("/v1/datasets/builtin", "POST"),
    ):
        response = client.request("PUT", path)
        assert_problem(response, 405, "method-not-allowed")
        assert response.headers["allow"] == allow, path


def test_a_write_is_committed_before_its_response_is_sent(integration_settings):
    """The session committed after the response went out: a client could read stale data after a 2xx."""
    app = create_app(integration_settings, run_sweeper=False)
    events: list[str] = []

    async def observed(scope, receive, send):
        async def spy(message):
            if message["type"] == "http.response.start":
                events.append("response")
            await send(message)

        await app(scope, receive, spy)

    def committed(session):
        events.append("commit")

    event.listen(Session, "after_commit", committed)
    try:
        with TestClient(observed) as http:
            headers = {"Authorization": f"Bearer {mint_key(integration_settings, 'tenant-fuzz-commit')}"}
            created = http.post("/v1/datasets/builtin", headers=headers, json={"builtin": "sklearn:digits"})
    finally:
        event.remove(Session, "after_commit", committed)
    assert created.status_code == 201, created.text
    assert events[-1] == "response", events
