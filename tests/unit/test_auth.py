"""API keys, scopes, quotas and rate limits on the embedded profile (real SQLite, in-process app).

The route inventory walks ``app.routes``: a new route that forgets its access
dependency, or answers without a valid key, fails here.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from datetime import timedelta

import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.api.auth import PUBLIC_PATHS, require_admin, require_read, require_write
from app.api.openapi import api_routes
from app.db.base import utcnow
from app.db.migrate import upgrade
from app.db.session import session_scope
from app.main import create_app
from app.schemas.tenants import TenantCreate, TenantLimits
from app.services import api_keys, tenants
from app.settings import Settings
from tests.integration.flows import register_model

PROBLEM = "application/problem+json"
LINEAR = {"name": "linear", "params": {"in_features": 30, "num_classes": 2}}


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    data = tmp_path_factory.mktemp("auth")
    settings = Settings(data_dir=data, sweep_interval_seconds=0)
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture(scope="module")
def app(settings):
    return create_app(settings, run_sweeper=False)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def mint(settings: Settings, tenant: str, scopes=("read", "write"), limits: dict | None = None, **kw) -> str:
    with session_scope(settings) as session:
        row = tenants.by_name(session, tenant) or tenants.create(
            session, TenantCreate(name=tenant, limits=TenantLimits(**(limits or {})))
        )
        return api_keys.create(session, settings, row, name="t", scopes=list(scopes), **kw)[1]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _protected_routes(app) -> list[APIRoute]:
    return [r for r in api_routes(app.routes) if r.path not in PUBLIC_PATHS]


def _calls(dependant) -> set:
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


def _concrete(path: str) -> str:
    return path.replace("{", "").replace("}", "")  # /v1/models/{model_id} -> /v1/models/model_id


def _requests(app):
    for route in _protected_routes(app):
        for method in sorted(route.methods - {"HEAD"}):
            yield method, _concrete(route.path), route


# --- token format and hashing -------------------------------------------------------------------


def test_token_is_typed_checksummed_and_parsed():
    token, key_id = api_keys.new_token()
    assert token.startswith("iak_") and api_keys.parse(token) == key_id
    tampered = token[:-7] + ("A" if token[-7] != "A" else "B") + token[-6:]
    assert api_keys.parse(tampered) is None  # one changed character breaks the CRC
    assert api_keys.parse(token[:-1]) is None and api_keys.parse("Bearer " + token) is None


def test_only_a_keyed_hash_is_stored_and_compared_in_constant_time(settings, http, monkeypatch):
    token = mint(settings, "hashing")
    with session_scope(settings) as session:
        stored = api_keys.list_for(session, tenants.by_name(session, "hashing").id)[0]
        assert token not in (stored.secret_hash, stored.key_id) and len(stored.secret_hash) == 64
        assert stored.secret_hash == hmac.new(api_keys.pepper(settings), token.encode(), "sha256").hexdigest()
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(api_keys.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    assert http.get("/v1/me", headers=auth(token)).status_code == 200
    assert http.get("/v1/me", headers=auth(api_keys.new_token()[0])).status_code == 401
    assert len(compared) == 2  # unknown keys are hashed and compared too: no timing shortcut


# --- the route inventory ------------------------------------------------------------------------


def test_every_protected_route_declares_a_scope(app):
    guards = {require_read, require_write, require_admin}
    missing = [
        f"{sorted(r.methods)} {r.path}" for r in _protected_routes(app) if not _calls(r.dependant) & guards
    ]
    assert not missing, f"routes without ReadAccess/WriteAccess/AdminAccess: {missing}"
    assert len(_protected_routes(app)) >= 25


def test_public_routes_answer_without_a_key(http):
    assert http.get("/healthz").status_code == 200
    assert http.get("/openapi.json").status_code == 200
    assert http.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "unauthenticated"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "unauthenticated"),
        ({"Authorization": "Bearer iak_not-a-key"}, "invalid-api-key"),
        ({"X-API-Key": "iak_000000000000_" + "0" * 38}, "invalid-api-key"),
    ],
)
def test_every_protected_route_refuses_missing_and_bad_keys(app, http, headers, code):
    for method, path, _route in _requests(app):
        response = http.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["content-type"] == PROBLEM and response.json()["code"] == code
        assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_and_expired_keys_are_refused_everywhere(app, http, settings):
    revoked = mint(settings, "lifecycle", scopes=("read", "write", "admin"))
    expired = mint(settings, "lifecycle", expires_at=utcnow() - timedelta(seconds=1))
    assert http.get("/v1/me", headers=auth(revoked)).status_code == 200
    with session_scope(settings) as session:
        tenant = tenants.by_name(session, "lifecycle")
        key_id = api_keys.parse(revoked)
    assert http.delete(f"/v1/tenants/{tenant.id}/api-keys/{key_id}", headers=auth(revoked)).status_code == 204
    for method, path, _route in _requests(app):
        for token, code in ((revoked, "api-key-revoked"), (expired, "api-key-expired")):
            response = http.request(method, path, headers=auth(token))
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == code


def test_wrong_scope_is_403_on_every_route(app, http, settings):
    read_only = mint(settings, "scopes", scopes=("read",))
    write_only = mint(settings, "scopes", scopes=("write",))
    for method, path, route in _requests(app):
        calls = _calls(route.dependant)
        for token, allowed in ((read_only, require_read), (write_only, require_write)):
            response = http.request(method, path, headers=auth(token))
            if allowed in calls:
                assert response.status_code != 403, (method, path, response.text)
            else:
                assert response.status_code == 403, (method, path, response.text)
                assert response.json()["code"] == "insufficient-scope"


def test_keys_are_header_only_and_never_logged(http, settings, caplog):
    token = mint(settings, "logging")
    caplog.set_level(logging.DEBUG)
    assert http.get("/v1/me", params={"api_key": token}).status_code == 401
    assert http.get("/v1/me", headers={"X-API-Key": token}).status_code == 200
    assert http.get("/v1/datasets/nope", headers=auth(token)).status_code == 404
    server_side = [r for r in caplog.records if not r.name.startswith("httpx")]  # the test client logs URLs
    assert server_side is not None and all(token not in r.getMessage() for r in server_side)
    logging.getLogger("uvicorn.access").info('"GET /v1/me?api_key=%s HTTP/1.1" 401', token)
    assert (
        token not in caplog.records[-1].getMessage() and "iak_[redacted]" in caplog.records[-1].getMessage()
    )


# --- tenants, keys and quotas -------------------------------------------------------------------


def test_admin_creates_tenants_and_keys_that_work_once_shown(http, settings):
    admin = mint(settings, "ops", scopes=("admin",))
    tenant = http.post(
        "/v1/tenants", headers=auth(admin), json={"name": "vision", "limits": {"max_running_jobs": 4}}
    )
    assert tenant.status_code == 201, tenant.text
    assert tenant.json()["effective_limits"]["max_running_jobs"] == 4
    assert http.post("/v1/tenants", headers=auth(admin), json={"name": "vision"}).status_code == 409
    assert http.post("/v1/tenants", headers=auth(admin), json={"name": "x", "owner": "me"}).status_code == 422
    created = http.post(
        f"/v1/tenants/{tenant.json()['id']}/api-keys",
        headers=auth(admin),
        json={"name": "ci", "scopes": ["read"]},
    )
    assert created.status_code == 201
    me = http.get("/v1/me", headers=auth(created.json()["key"])).json()
    assert me["tenant"]["name"] == "vision" and me["scopes"] == ["read"]
    listed = http.get(f"/v1/tenants/{tenant.json()['id']}/api-keys", headers=auth(admin)).json()
    assert [k["key_id"] for k in listed] == [created.json()["key_id"]] and "key" not in listed[0]


def test_read_rate_limit_answers_429_with_retry_after(http, settings):
    token = mint(settings, "chatty", limits={"read_requests_per_second": 3})
    time.sleep(1 - time.time() % 1 + 0.01)  # counted in one-second windows: start at one's beginning
    responses = [http.get("/v1/me", headers=auth(token)) for _ in range(8)]
    statuses = [r.status_code for r in responses]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses
    limited = responses[statuses.index(429)]
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["code"] == "rate-limited"
    assert http.get("/v1/me", headers=auth(mint(settings, "quiet"))).status_code == 200  # per tenant


def test_storage_quota_refuses_uploads_past_it(http, settings):
    token = mint(settings, "small-disk", limits={"max_storage_bytes": 100_000})
    body = {"builtin": "sklearn:breast_cancer", "split": "train"}
    first = http.post("/v1/datasets/builtin", headers=auth(token), json=body)
    assert first.status_code == 201, first.text  # ~100 KB of features: fits once
    second = http.post("/v1/datasets/builtin", headers=auth(token), json=body)
    assert second.status_code == 413 and second.json()["code"] == "storage-quota-exceeded"
    assert http.get("/v1/me", headers=auth(token)).json()["storage_bytes_used"] == first.json()["size_bytes"]


def test_weights_a_training_job_will_store_count_against_the_quota(http, settings):
    token = mint(settings, "trainer", limits={"max_storage_bytes": 150_000})
    data = http.post(
        "/v1/datasets/builtin",
        headers=auth(token),
        json={"builtin": "sklearn:breast_cancer", "split": "train"},
    ).json()

    def register(hidden: int, checkpoints: int):
        spec = {
            "name": f"mlp-{hidden}",
            "architecture": {
                "name": "mlp",
                "params": {"in_features": 30, "hidden": [hidden], "num_classes": 2},
            },
            "recipe": {"epochs": 2, "num_checkpoints": checkpoints},  # a checkpoint per epoch at most
            "train_dataset_id": data["id"],
        }
        return http.post("/v1/models", headers=auth(token), data={"spec": json.dumps(spec)})

    too_big = register(1024, 0)  # 33,794 float32 parameters: 135,176 bytes on top of the dataset
    assert too_big.status_code == 413 and too_big.json()["code"] == "storage-quota-exceeded"
    fits = register(64, 2)  # 2,114 parameters, stored three times (weights and two checkpoints)
    assert fits.status_code == 201, fits.text
    used = http.get("/v1/me", headers=auth(token)).json()["storage_bytes_used"]
    assert used == data["size_bytes"] + 3 * 4 * 2_114


def test_active_jobs_quota_answers_429(http, settings):
    token = mint(settings, "busy", limits={"max_active_jobs": 1})
    client = TestClient(http.app, headers=auth(token))
    train = client.post(
        "/v1/datasets/builtin", json={"builtin": "sklearn:breast_cancer", "split": "train"}
    ).json()
    weights = {"1.weight": torch.zeros(2, 30), "1.bias": torch.zeros(2)}
    model = register_model(client, {"name": "m", "architecture": LINEAR}, weights=weights)
    assert model.status_code == 201, model.text
    body = {"model_id": model.json()["id"], "train_dataset_id": train["id"], "method": {"name": "grad_dot"}}
    assert client.post("/v1/influence-jobs", json=body).status_code == 202
    refused = client.post("/v1/influence-jobs", json=body)
    assert refused.status_code == 429 and refused.json()["code"] == "job-quota-exceeded"
    assert int(refused.headers["retry-after"]) > 0


def test_first_embedded_start_creates_one_local_admin_key(tmp_path):
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url)
    with session_scope(settings) as session:
        token = api_keys.ensure_local_admin(session, settings)
    with session_scope(settings) as session:
        assert api_keys.ensure_local_admin(session, settings) is None
        principal = api_keys.authenticate(session, settings, token)
    assert principal.scopes == {"read", "write", "admin"}
    path = api_keys.admin_key_file(settings)
    assert path.read_text().strip() == token and path.stat().st_mode & 0o777 == 0o600


def test_a_shared_database_needs_the_pepper(tmp_path, monkeypatch):
    """CONVENTIONS (secrets have no defaults): with IA_DATABASE_URL, a generated pepper would differ per
    host, so the API, `influence serve` and `influence keys create` refuse to start without one."""
    from click.testing import CliRunner

    from app.cli import main
    from app.settings import get_settings

    monkeypatch.delenv("IA_API_KEY_PEPPER", raising=False)
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # never reached: the check comes first
    with pytest.raises(api_keys.MissingPepper, match="IA_API_KEY_PEPPER is required"):
        create_app(Settings(_env_file=None, database_url=url, data_dir=tmp_path), run_sweeper=False)
    assert not (tmp_path / "api-key-pepper").exists()
    env = {"IA_DATABASE_URL": url, "IA_DATA_DIR": str(tmp_path)}
    for argv in (["serve", "--no-worker"], ["keys", "create", "--tenant", "ops"]):
        get_settings.cache_clear()  # the CLI reads the environment set here
        result = CliRunner().invoke(main, argv, env=env)
        get_settings.cache_clear()
        assert result.exit_code == 1 and "IA_API_KEY_PEPPER is required" in result.output, argv
    with_pepper = Settings(_env_file=None, database_url=url, data_dir=tmp_path, api_key_pepper="s3cret")
    assert api_keys.pepper(with_pepper) == b"s3cret"
