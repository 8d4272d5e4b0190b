"""HTTP rules of CONVENTIONS.md section 5 through the real API process: conditional PATCH, 409s on
state conflicts, Retry-After, list filters, and multi-page cursor walks of every paged listing.

Each walk runs in a tenant of its own, so the listings hold exactly the objects the test created.
Jobs stay ``queued`` here (no worker consumes the queue) except in the last test, which starts one.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator

import httpx
import pytest
from safetensors.torch import save as save_tensors

from app.estimators import get_architecture, init_model
from app.services.pagination import encode_token
from app.services.validation import validate_params
from tests.conftest import mint_key
from tests.integration.flows import assert_problem, builtin, register_model, submit, wait

pytestmark = pytest.mark.integration

LINEAR = {"name": "linear", "params": {"in_features": 64, "num_classes": 10}}  # fits sklearn:digits
ROOMY = {
    "max_active_jobs": 10_000,
    "max_running_jobs": 100,
    "read_requests_per_second": 10_000,
    "write_requests_per_second": 10_000,
}


def _weights(seed: int) -> dict:
    arch = get_architecture("linear")
    return init_model(arch, validate_params(arch.Params, LINEAR["params"], ""), seed=seed).state_dict()


def _tenant_client(api_server, settings) -> httpx.Client:
    """A client of a brand-new tenant (roomy quotas), whose listings start empty."""
    key = mint_key(settings, f"http-rules-{uuid.uuid4().hex[:8]}", limits=ROOMY)
    return api_server.client(key)


def _model(client: httpx.Client, name: str, steps: tuple[int, ...] = ()) -> dict:
    spec = {
        "name": name,
        "architecture": LINEAR,
        "checkpoints": [{"step": s, "learning_rate": 0.1} for s in steps],
    }
    response = register_model(client, spec, weights=_weights(0), checkpoints=[_weights(s + 1) for s in steps])
    assert response.status_code == 201, response.text
    return response.json()


def _job_body(model_id: str, train_id: str) -> dict:
    return {
        "model_id": model_id,
        "train_dataset_id": train_id,
        "query_indices": [0, 1],
        "method": {"name": "grad_dot"},
        "output": {"top_k": 3},
    }


def _queued(client: httpx.Client, body: dict) -> dict:
    response = submit(client, body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued", job
    return job


def _cancel_all(client: httpx.Client) -> None:
    """Cancel what this tenant left queued, so a later module's worker does not run it."""
    for job in _walk(client, "/v1/influence-jobs", 500, state="queued")[0]:
        client.post(f"/v1/influence-jobs/{job['id']}/cancel")


def _walk(client: httpx.Client, path: str, page_size: int, **params) -> tuple[list[dict], int]:
    """Follow next_page_token to the end: (every item in order, number of pages)."""
    items: list[dict] = []
    token = None
    pages = 0
    while True:
        query = {"page_size": page_size, **params, **({"page_token": token} if token else {})}
        response = client.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        assert len(body["items"]) <= page_size
        items += body["items"]
        token = body.get("next_page_token")
        if token is None:  # the last page carries no token: the field is absent (CONVENTIONS.md)
            assert "next_page_token" not in body, body
            return items, pages
        assert len(body["items"]) == page_size, "only the last page may be short"
        assert pages < 1000


def _assert_each_once(items: list[dict], expected_ids: set[str], page_size: int, pages: int) -> None:
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)), "an item was served twice"
    assert set(ids) == expected_ids
    # A page size that divides the count ends on a full page without a token, not an empty extra page.
    assert pages == max(1, math.ceil(len(expected_ids) / page_size))


def _assert_newest_first(items: list[dict]) -> None:
    keys = [(item["created_at"], item["id"]) for item in items]
    assert keys == sorted(keys, reverse=True)


@pytest.fixture(scope="module")
def world(api_server, integration_settings) -> Iterator[tuple[httpx.Client, dict, dict]]:
    """This module's tenant, a training set and a linear model with weights and two checkpoints."""
    with _tenant_client(api_server, integration_settings) as client:
        train = builtin(client, "sklearn:digits", "train")
        model = _model(client, "rules", steps=(10, 20))
        yield client, train, model
        _cancel_all(client)


# --- conditional requests and state conflicts ------------------------------------------------------


def test_patch_with_a_stale_if_match_is_412(world):
    client, _, _ = world
    model = _model(client, "before")
    url = f"/v1/models/{model['id']}"
    first = client.get(url)
    assert first.status_code == 200
    stale = first.headers["etag"]

    renamed = client.patch(url, json={"name": "after"}, headers={"If-Match": stale})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "after"
    current = renamed.headers["etag"]
    assert current != stale

    body = assert_problem(
        client.patch(url, json={"name": "lost-update"}, headers={"If-Match": stale}),
        412,
        "precondition-failed",
    )
    assert body["instance"] and body["request_id"]
    assert_problem(
        client.patch(url, json={"name": "lost-update"}, headers={"If-Match": 'W/"nonsense"'}),
        412,
        "precondition-failed",
    )
    # Nothing changed: the current ETag still matches.
    assert client.get(url).json()["name"] == "after"
    assert client.get(url, headers={"If-None-Match": current}).status_code == 304
    # RFC 9110 forms: a list, the strong spelling (weak comparison) and "*"
    for listed in (f"{stale}, {current}", current.removeprefix("W/"), "*"):
        assert client.get(url, headers={"If-None-Match": listed}).status_code == 304, listed
    assert client.get(url, headers={"If-None-Match": stale}).status_code == 200
    star = client.patch(url, json={"name": "any-version"}, headers={"If-Match": "*"})
    assert star.status_code == 200 and star.json()["name"] == "any-version"


def test_two_patches_matching_the_same_etag_cannot_both_win(world, integration_settings):
    """The If-Match check and the update are one fenced UPDATE: of two renames that read the same
    version (both passed the ETag check), the one committing second updates nothing and is a 412."""
    from app.db.models import Model
    from app.db.session import session_scope
    from app.services import models as models_service

    client, _, _ = world
    model = _model(client, "raced")
    url = f"/v1/models/{model['id']}"
    with session_scope(integration_settings) as slow:
        read_by_slow = slow.get(Model, model["id"])
        version = read_by_slow.version
        with session_scope(integration_settings) as fast:
            assert models_service.rename(fast, fast.get(Model, model["id"]), "fast", if_version=version)
        assert models_service.rename(slow, read_by_slow, "slow", if_version=version) is None
    assert client.get(url).json()["name"] == "fast"
    etag = client.get(url).headers["etag"]
    renamed = client.patch(url, json={"name": "third"}, headers={"If-Match": etag})
    assert renamed.status_code == 200 and renamed.json()["name"] == "third"
    unconditional = client.patch(url, json={"name": "fourth"})  # no If-Match: last writer wins
    assert unconditional.status_code == 200 and unconditional.headers["etag"] != renamed.headers["etag"]


def test_two_uploads_at_the_same_step_give_one_checkpoint_and_a_409(world, integration_settings, tmp_path):
    """Both pass the duplicate check on the model they read; the second re-checks under the tenant lock
    that orders them and answers 409 (the unique index refused its insert with a 500 before)."""
    from app.db.models import Model, Tenant
    from app.db.session import session_scope
    from app.problems import ProblemError
    from app.schemas.models import CheckpointMeta
    from app.services import api_keys, tenants
    from app.services import models as models_service
    from app.storage.artifacts import ArtifactStore

    client, _, _ = world
    model = _model(client, "same-step")
    store = ArtifactStore(integration_settings.resolved_artifact_dir)
    with session_scope(integration_settings) as slow:
        read_by_slow = slow.get(Model, model["id"])
        assert read_by_slow.checkpoints == []  # what the slow upload checked
        files = {"file": ("c.safetensors", save_tensors(_weights(1)), "application/octet-stream")}
        fast = client.post(f"/v1/models/{model['id']}/checkpoints", files=files, data={"step": "5"})
        assert fast.status_code == 201, fast.text
        staged = tmp_path / "c.safetensors"
        staged.write_bytes(save_tensors(_weights(2)))
        upload = models_service.WeightsUpload(staged, "0" * 64, "/file")
        tenant = slow.get(Tenant, read_by_slow.tenant_id)
        owner = api_keys.Principal(
            tenant.id, "k", frozenset({"write"}), tenants.effective_limits(integration_settings, tenant)
        )
        with pytest.raises(ProblemError) as refused:
            models_service.add_checkpoint(
                slow, store, integration_settings, owner, read_by_slow, upload, CheckpointMeta(step=5)
            )
        slow.rollback()
    assert refused.value.status == 409 and refused.value.code == "conflict"
    listed = client.get(f"/v1/models/{model['id']}/checkpoints").json()["items"]
    assert [c["step"] for c in listed] == [5]


def test_delete_model_with_a_queued_job_is_409(world):
    client, train, _ = world
    model = _model(client, "busy")
    job = _queued(client, _job_body(model["id"], train["id"]))

    assert_problem(client.delete(f"/v1/models/{model['id']}"), 409, "model-in-use")
    assert client.get(f"/v1/models/{model['id']}").status_code == 200

    assert client.post(f"/v1/influence-jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204  # no active job any more
    assert_problem(client.get(f"/v1/models/{model['id']}"), 404, "not-found")


def test_delete_a_non_terminal_job_is_409(world):
    client, train, model = world
    job = _queued(client, _job_body(model["id"], train["id"]))
    url = f"/v1/influence-jobs/{job['id']}"

    assert_problem(client.delete(url), 409, "job-active")
    assert client.get(url).json()["state"] == "queued"

    assert client.post(url + "/cancel").status_code == 202
    assert client.delete(url).status_code == 204
    assert_problem(client.get(url), 404)


def test_retry_after_while_a_job_is_not_terminal(world):
    client, train, model = world
    response = submit(client, _job_body(model["id"], train["id"]))
    assert response.status_code == 202, response.text
    assert int(response.headers["retry-after"]) >= 1
    location = response.headers["location"]

    polled = client.get(location)
    assert polled.status_code == 200 and polled.json()["state"] == "queued"
    assert int(polled.headers["retry-after"]) >= 1
    # The 304 of a conditional poll keeps telling the client when to come back.
    not_modified = client.get(location, headers={"If-None-Match": polled.headers["etag"]})
    assert not_modified.status_code == 304
    assert int(not_modified.headers["retry-after"]) >= 1

    cancelled = client.post(location + "/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    again = client.post(location + "/cancel")  # idempotent
    assert again.status_code == 202 and again.json()["state"] == "cancelled"
    terminal = client.get(location)
    assert terminal.json()["state"] == "cancelled"
    assert "retry-after" not in terminal.headers


# --- listings: filters and cursor walks -------------------------------------------------------------


def test_job_list_filters_and_walk(api_server, integration_settings):
    with _tenant_client(api_server, integration_settings) as client:
        try:
            train = builtin(client, "sklearn:digits", "train")
            a, b = _model(client, "a"), _model(client, "b")
            on_a = [_queued(client, _job_body(a["id"], train["id"]))["id"] for _ in range(3)]
            on_b = [_queued(client, _job_body(b["id"], train["id"]))["id"] for _ in range(2)]
            cancelled = on_a[0]
            assert client.post(f"/v1/influence-jobs/{cancelled}/cancel").json()["state"] == "cancelled"
            queued = set(on_a[1:] + on_b)

            def ids(**params) -> set[str]:
                items, _ = _walk(client, "/v1/influence-jobs", 500, **params)
                for item in items:
                    for name, value in params.items():
                        assert item[name] == value, (name, item)
                return {item["id"] for item in items}

            assert ids(state="queued") == queued
            assert ids(state="cancelled") == {cancelled}
            assert ids(state="succeeded") == set()
            assert ids(model_id=a["id"]) == set(on_a)
            assert ids(model_id=b["id"]) == set(on_b)
            assert ids(model_id=a["id"], state="queued") == set(on_a[1:])
            assert ids(model_id=str(uuid.uuid4())) == set()
            assert_problem(client.get("/v1/influence-jobs", params={"state": "sleeping"}), 422)

            for page_size in (1, 2, 5):
                items, pages = _walk(client, "/v1/influence-jobs", page_size)
                _assert_each_once(items, set(on_a + on_b), page_size, pages)
                _assert_newest_first(items)
            items, pages = _walk(client, "/v1/influence-jobs", 3, state="queued")
            _assert_each_once(items, queued, 3, pages)
        finally:
            _cancel_all(client)


def test_model_and_dataset_walks(api_server, integration_settings):
    with _tenant_client(api_server, integration_settings) as client:
        datasets = {builtin(client, "sklearn:digits", split)["id"] for split in ("train", "test", "all")}
        models = {_model(client, f"m{i}")["id"] for i in range(5)}
        for page_size in (1, 2, 3, 500):
            items, pages = _walk(client, "/v1/datasets", page_size)
            _assert_each_once(items, datasets, page_size, pages)
            _assert_newest_first(items)
        for page_size in (1, 2, 5, 500):
            items, pages = _walk(client, "/v1/models", page_size)
            _assert_each_once(items, models, page_size, pages)
            _assert_newest_first(items)


def test_checkpoint_walk(world):
    client, _, _ = world
    model = _model(client, "many-checkpoints", steps=(10, 20, 30, 40, 50))
    url = f"/v1/models/{model['id']}/checkpoints"
    added = client.post(
        url,
        data={"step": "5", "learning_rate": "0.2"},
        files={"file": ("c.safetensors", save_tensors(_weights(9)))},
    )
    assert added.status_code == 201, added.text
    one = client.get(added.headers["location"])  # the new checkpoint itself, with an ETag
    assert one.status_code == 200 and one.json() == added.json()
    assert (
        client.get(added.headers["location"], headers={"If-None-Match": one.headers["etag"]}).status_code
        == 304
    )
    assert_problem(client.get(f"{url}/{uuid.uuid4()}"), 404, "not-found")
    everything = client.get(url).json()
    assert everything.get("next_page_token") is None
    assert [c["step"] for c in everything["items"]] == [5, 10, 20, 30, 40, 50]
    assert client.get(f"/v1/models/{model['id']}").json()["n_checkpoints"] == 6

    expected = {c["id"] for c in everything["items"]}
    for page_size in (1, 2, 4, 6, 500):
        items, pages = _walk(client, url, page_size)
        _assert_each_once(items, expected, page_size, pages)
        assert [c["step"] for c in items] == [5, 10, 20, 30, 40, 50]
        assert all(c["model_id"] == model["id"] for c in items)

    first = client.get(url, params={"page_size": 2}).json()
    assert [c["step"] for c in first["items"]] == [5, 10]
    second = client.get(url, params={"page_size": 2, "page_token": first["next_page_token"]}).json()
    assert [c["step"] for c in second["items"]] == [20, 30]


@pytest.mark.parametrize(
    "params",
    [
        {"page_token": "not a token"},
        {"page_token": encode_token("2020-01-01T00:00:00+00:00", "some-id")},  # a /v1/models token
        {"page_token": encode_token("ten")},
        {"page_token": encode_token(True)},
        {"page_token": encode_token(-1)},
        {"page_size": 0},
        {"page_size": 501},
    ],
)
def test_checkpoint_paging_rejects_bad_parameters(world, params):
    client, _, model = world
    body = assert_problem(client.get(f"/v1/models/{model['id']}/checkpoints", params=params), 422)
    assert body["errors"], body


@pytest.mark.parametrize(
    ("token", "int_cursor_lists_too"),
    [
        (encode_token(3), False),  # a checkpoints/results token: valid there, foreign to the others
        (encode_token("2020-01-01T00:00:00+00:00", "some-id", 7), True),  # one value too many
        (encode_token("2020-01-01T00:00:00", "some-id"), True),  # no time zone
        (encode_token(5, "some-id"), True),
        (encode_token("2020-01-01T00:00:00+00:00", 5), True),
    ],
)
def test_a_token_of_another_listing_is_422_on_every_list(world, token, int_cursor_lists_too):
    client, train, model = world
    job = _queued(client, _job_body(model["id"], train["id"]))
    paths = ["/v1/models", "/v1/datasets", "/v1/influence-jobs"]
    if int_cursor_lists_too:
        paths += [
            f"/v1/models/{model['id']}/checkpoints",
            f"/v1/influence-jobs/{job['id']}/results",
            f"/v1/influence-jobs/{job['id']}/values",
            f"/v1/influence-jobs/{job['id']}/group-influence",
        ]
    for path in paths:
        response = client.get(path, params={"page_token": token})
        if response.status_code == 409:  # the job has no result yet: checked before the token
            continue
        body = assert_problem(response, 422)
        assert [e["pointer"] for e in body["errors"]] == ["/page_token"], (path, body)


def test_checkpoints_of_an_unknown_model_is_404(world):
    client, _, _ = world
    assert_problem(client.get(f"/v1/models/{uuid.uuid4()}/checkpoints", params={"page_size": 2}), 404)


# --- with a worker ---------------------------------------------------------------------------------


def test_cancel_or_poll_a_succeeded_job(world, worker_factory):
    client, train, model = world
    _cancel_all(client)  # the worker below should only find this test's job
    worker_factory()
    job = wait(client, submit(client, _job_body(model["id"], train["id"])).headers["location"])
    assert job["state"] == "succeeded", job
    url = f"/v1/influence-jobs/{job['id']}"

    assert "retry-after" not in client.get(url).headers
    assert_problem(client.post(url + "/cancel"), 409, "job-finished")
    assert client.get(url).json()["state"] == "succeeded"
    assert client.delete(url).status_code == 204  # terminal jobs can be deleted
    assert_problem(client.get(url), 404)


def test_problem_types_are_served_as_the_catalogue(client):
    from app.problems import PROBLEM_BASE_URI, PROBLEM_TYPES

    body = client.get("/v1/problem-types").json()
    assert [t["code"] for t in body] == sorted(PROBLEM_TYPES)
    for item in body:
        expected = PROBLEM_TYPES[item["code"]]
        assert item["type"] == PROBLEM_BASE_URI + item["code"]
        assert item["statuses"] == list(expected.statuses) and item["description"] == expected.description
    # a problem the API answers with is one of them
    missing = client.get("/v1/models/no-such-model").json()
    assert missing["code"] in PROBLEM_TYPES and missing["type"] in {t["type"] for t in body}
