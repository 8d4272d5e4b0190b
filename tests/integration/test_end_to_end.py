"""register -> train -> influence job -> results, through the real API process, Celery worker,
PostgreSQL and Redis; results must equal calling the estimator library directly."""

from __future__ import annotations

import dataclasses
import io
from datetime import timedelta

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, update

from app.db.base import utcnow
from app.db.models import Job
from app.estimators import REGISTRY, Recipe, TaskSpec, init_model
from app.estimators import train as train_model
from app.services.validation import validate_params
from tests.integration.flows import (
    DIGITS_MLP,
    FAST_RECIPE,
    assert_problem,
    builtin,
    library_problem,
    register_model,
    scores,
    submit,
    train_digits_model,
    wait,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(api_server, integration_env, tmp_path_factory):
    """One worker, two datasets and a model trained by the service, shared by this module."""

    from tests.conftest import WorkerProcess

    worker = WorkerProcess(integration_env, tmp_path_factory.mktemp("w") / "worker.log").start()
    with api_server.client() as client:
        train = builtin(client, "sklearn:digits", "train")
        test = builtin(client, "sklearn:digits", "test")
        model = train_digits_model(client, train["id"])
        yield client, train, test, model
    worker.stop()


@pytest.mark.parametrize(
    "method,params,measurement",
    [
        ("tracincp", {}, "loss"),
        ("grad_dot", {}, "margin"),
        ("grad_cos", {}, "loss"),
        ("hydra", {}, "margin"),
        ("source", {}, "loss"),
        ("fastif", {"damping": 0.3, "scale": 20.0, "depth": 200, "k_candidates": 50}, "margin"),
    ],
)
def test_job_results_equal_direct_call(trained, integration_settings, method, params, measurement):
    client, train, test, model = trained
    assert model["state"] == "ready" and model["n_checkpoints"] == 3
    queries = [0, 5, 17, 42]
    response = submit(
        client,
        {
            "model_id": model["id"],
            "train_dataset_id": train["id"],
            "query_dataset_id": test["id"],
            "query_indices": queries,
            "method": {"name": method, "params": params},
            "measurement": measurement,
            "output": {"top_k": 7, "keep_full_matrix": True, "self_influence": method != "grad_cos"},
        },
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/influence-jobs/{response.json()['id']}"
    job = wait(client, response.headers["location"])
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1 and job["progress"]["fraction"] == 1.0

    got = scores(client, job["id"])
    problem = library_problem(integration_settings, client, model, train, test, queries, measurement)
    estimator = REGISTRY[method]
    want = estimator.attribute(
        problem, validate_params(estimator.Params, params, ""), want_self_influence=method != "grad_cos"
    )
    assert got.shape == (len(queries), train["n_examples"])
    np.testing.assert_allclose(got, want.scores, rtol=1e-4, atol=1e-6)

    results = client.get(f"/v1/influence-jobs/{job['id']}/results").json()
    assert results["orientation"].startswith("query-major") and results["measurement"] == measurement
    assert [item["query_row"] for item in results["items"]] == queries
    for item in results["items"]:
        row = want.scores[item["query_index"]]
        np.testing.assert_allclose(
            [p["score"] for p in item["proponents"]], np.sort(row)[::-1][:7], rtol=1e-4
        )
        np.testing.assert_allclose([p["score"] for p in item["opponents"]], np.sort(row)[:7], rtol=1e-4)
        assert item["proponents"][0]["score"] >= item["opponents"][0]["score"]
        assert all(p["train_id"] is not None for p in item["proponents"])
    if method != "grad_cos":
        import io

        raw = client.get(f"/v1/influence-jobs/{job['id']}/artifacts/self-influence").content
        np.testing.assert_allclose(np.load(io.BytesIO(raw)), want.self_influence, rtol=1e-4, atol=1e-6)


def test_lora_adapters_of_a_registered_base(trained, integration_settings):
    """A lora_mlp registered with uploaded weights (the service-trained mlp as its frozen base, adapters
    fine-tuned here): a DataInf job attributes through the adapters only and equals the library call."""
    client, train, test, base_model = trained
    base = library_problem(integration_settings, client, base_model, train, test, [0])
    params = {**DIGITS_MLP["params"], "rank": 2, "alpha": 2.0}
    module = init_model("lora_mlp", params, 0)
    module.load_state_dict(base.weights, strict=False)
    recipe = Recipe(learning_rate=0.05, epochs=2, batch_size=64, weight_decay=1e-3, num_checkpoints=0)
    tuned = train_model(module, TaskSpec(), base.train_x[:400].float(), base.train_y[:400], recipe)
    spec = {
        "name": "digits-lora",
        "architecture": {"name": "lora_mlp", "params": params},
        "recipe": {**FAST_RECIPE, "weight_decay": 1e-3},
    }
    response = register_model(client, spec, tuned.weights)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["state"] == "ready" and model["n_parameters"] == 64 * 32 + 32 + 32 * 10 + 10 + 2 * (
        64 + 32 + 32 + 10
    )
    queries = [1, 2, 3]
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": queries,
        "method": {"name": "datainf", "params": {}},
        "output": {"keep_full_matrix": True},
    }
    job = wait(client, submit(client, body).headers["location"])
    assert job["state"] == "succeeded", job
    problem = library_problem(integration_settings, client, model, train, test, queries)
    for name in ("1.weight", "3.bias"):  # the frozen base is the registered mlp's
        assert torch.equal(problem.weights[name], base.weights[name])
    want = REGISTRY["datainf"].attribute(problem, None)
    assert want.metadata["layers"] == ["1.lora_A", "1.lora_B", "3.lora_A", "3.lora_B"]
    np.testing.assert_allclose(scores(client, job["id"]), want.scores, rtol=1e-4, atol=1e-6)


def test_training_and_retraining_start_from_initial_weights(trained, integration_settings):
    """A lora_mlp trained by the service from uploaded initial weights (the service-trained mlp as its
    base, fresh adapters): only the adapters change, and a retraining job (LOO) retrains from those
    initial weights: equal to the library call with them, unlike retraining from a seeded init."""
    client, train, test, base_model = trained
    base = library_problem(integration_settings, client, base_model, train, test, [0])
    buffer = io.BytesIO()
    np.savez(buffer, X=base.train_x[:40].numpy(), y=base.train_y[:40].numpy())
    files = {"file": ("small.npz", buffer.getvalue(), "application/octet-stream")}
    small = client.post("/v1/datasets", files=files, data={"name": "digits-40"})
    assert small.status_code == 201, small.text
    small = small.json()
    params = {**DIGITS_MLP["params"], "rank": 2}
    start = init_model("lora_mlp", params, 3)
    start.load_state_dict(base.weights, strict=False)
    initial = start.state_dict()
    spec = {
        "name": "digits-lora-tuned",
        "architecture": {"name": "lora_mlp", "params": params},
        "recipe": {**FAST_RECIPE, "epochs": 3, "batch_size": 8, "num_checkpoints": 2},
        "train_dataset_id": small["id"],
    }
    assert_problem(register_model(client, spec, weights=initial, initial_weights=initial), 422)
    response = register_model(client, spec, initial_weights=initial)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["state"] == "training" and model["initial_weights_sha256"] is not None
    assert wait(client, f"/v1/training-jobs/{model['training_job_id']}")["state"] == "succeeded"
    model = client.get(f"/v1/models/{model['id']}").json()
    problem = library_problem(integration_settings, client, model, small, test, [0, 1, 2])
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):  # the base: frozen
        assert torch.equal(problem.weights[name], initial[name]), name
    assert not torch.equal(problem.weights["1.lora_A.weight"], initial["1.lora_A.weight"])
    assert problem.weights["3.lora_B.weight"].abs().max() > 0  # B started at zero and was trained

    body = {
        "model_id": model["id"],
        "train_dataset_id": small["id"],
        "query_dataset_id": test["id"],
        "query_indices": [0, 1, 2],
        "method": {"name": "loo", "params": {}},
        "output": {"keep_full_matrix": True},
    }
    job = wait(client, submit(client, body).headers["location"])
    assert job["state"] == "succeeded", job
    want = REGISTRY["loo"].attribute(problem, None)
    np.testing.assert_allclose(scores(client, job["id"]), want.scores, rtol=1e-4, atol=1e-6)
    seeded = REGISTRY["loo"].attribute(dataclasses.replace(problem, initial_weights=None), None)
    assert not np.allclose(seeded.scores, want.scores, rtol=1e-2, atol=1e-6)


def test_results_paging_and_formats(trained):
    client, train, test, model = trained
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": list(range(5)),
        "method": {"name": "grad_dot"},
        "output": {"top_k": 3},
    }
    job = wait(client, submit(client, body).headers["location"])
    first = client.get(f"/v1/influence-jobs/{job['id']}/results", params={"page_size": 2}).json()
    assert [i["query_index"] for i in first["items"]] == [0, 1] and first["next_page_token"]
    second = client.get(
        f"/v1/influence-jobs/{job['id']}/results",
        params={"page_size": 2, "page_token": first["next_page_token"]},
    ).json()
    assert [i["query_index"] for i in second["items"]] == [2, 3]
    one = client.get(f"/v1/influence-jobs/{job['id']}/results", params={"query_index": 4}).json()
    assert [i["query_index"] for i in one["items"]] == [4] and len(one["items"][0]["proponents"]) == 3
    assert_problem(client.get(f"/v1/influence-jobs/{job['id']}/artifacts/scores"), 404, "artifact-not-kept")
    # ETag round trip on the status monitor.
    first_get = client.get(f"/v1/influence-jobs/{job['id']}")
    again = client.get(
        f"/v1/influence-jobs/{job['id']}", headers={"If-None-Match": first_get.headers["etag"]}
    )
    assert again.status_code == 304


def test_idempotency_key(trained, integration_settings):
    client, train, test, model = trained
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": [1],
        "method": {"name": "grad_dot"},
    }
    first = submit(client, body, **{"Idempotency-Key": "k-123"})
    again = submit(client, body, **{"Idempotency-Key": "k-123"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = submit(client, {**body, "query_indices": [2]}, **{"Idempotency-Key": "k-123"})
    assert_problem(other, 422, "idempotency-key-reused")
    wait(client, first.headers["location"])
    # a key is kept for 24 h: a day later it names a new request (the old job keeps its id and result)
    engine = create_engine(integration_settings.resolved_database_url)
    with engine.begin() as conn:
        conn.execute(
            update(Job).where(Job.id == first.json()["id"]).values(created_at=utcnow() - timedelta(hours=25))
        )
    engine.dispose()
    later = submit(client, {**body, "query_indices": [2]}, **{"Idempotency-Key": "k-123"})
    assert later.status_code == 202, later.text
    assert later.json()["id"] != first.json()["id"]
    assert (
        submit(client, {**body, "query_indices": [2]}, **{"Idempotency-Key": "k-123"}).json()["id"]
        == (later.json()["id"])
    )
    assert client.get(first.headers["location"]).json()["state"] == "succeeded"
    wait(client, later.headers["location"])


def test_submit_time_refusals(trained):
    client, train, test, model = trained
    base = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "method": {"name": "tracincp"},
    }
    body = assert_problem(submit(client, {**base, "method": {"name": "nope"}}), 422)
    assert body["errors"][0]["pointer"] == "/method/name"
    body = assert_problem(
        submit(client, {**base, "method": {"name": "if_exact", "params": {"damping": -1}}}), 422
    )
    assert body["errors"][0]["pointer"] == "/method/params/damping"
    body = assert_problem(
        submit(client, {**base, "method": {"name": "tracincp", "params": {"bogus": 1}}}), 422
    )
    assert body["errors"][0]["pointer"] == "/method/params/bogus"
    body = assert_problem(submit(client, {**base, "query_indices": [10_000]}), 422)
    assert body["errors"][0]["pointer"] == "/query_indices"
    body = assert_problem(submit(client, {**base, "unknown_field": 1}), 422)
    assert body["errors"][0]["pointer"] == "/unknown_field"
    assert_problem(client.get("/v1/influence-jobs/does-not-exist"), 404, "not-found")


def test_cost_cap_refuses_at_submit(api_server, integration_env, tmp_path_factory, trained):
    """A second API process with a tiny cost cap refuses the same job with 422 before queueing."""

    from tests.conftest import ServerProcess

    client, train, test, model = trained
    env = {**integration_env, "IA_MAX_JOB_COST": "1000", "IA_SWEEP_INTERVAL_SECONDS": "0"}
    server = ServerProcess(env, tmp_path_factory.mktemp("cap") / "api.log", "--no-worker").wait_ready()
    try:
        with server.client(api_key=client.headers["authorization"].removeprefix("Bearer ")) as capped:
            body = assert_problem(
                submit(
                    capped,
                    {
                        "model_id": model["id"],
                        "train_dataset_id": train["id"],
                        "method": {"name": "grad_dot"},
                    },
                ),
                422,
                "job-too-large",
            )
            assert "exceeds the limit" in body["detail"]
    finally:
        server.stop()


def test_exact_influence_on_service_trained_logistic_regression(trained, integration_settings):
    """L-BFGS training on the service reaches the optimum; if_exact through the API = the library call."""
    client, _, _, _ = trained
    train = builtin(client, "sklearn:breast_cancer", "train")
    test = builtin(client, "sklearn:breast_cancer", "test")
    spec = {
        "name": "cancer-logreg",
        "architecture": {"name": "linear", "params": {"in_features": 30, "num_classes": 2}},
        "recipe": {
            "optimizer": "lbfgs",
            "learning_rate": 1.0,
            "epochs": 200,
            "weight_decay": 1e-2,
            "num_checkpoints": 1,
        },
        "train_dataset_id": train["id"],
    }
    from tests.integration.flows import register_model

    model = register_model(client, spec).json()
    assert wait(client, f"/v1/training-jobs/{model['training_job_id']}")["state"] == "succeeded"
    model = client.get(f"/v1/models/{model['id']}").json()
    queries = list(range(10))
    job = wait(
        client,
        submit(
            client,
            {
                "model_id": model["id"],
                "train_dataset_id": train["id"],
                "query_dataset_id": test["id"],
                "query_indices": queries,
                "method": {"name": "if_exact", "params": {"damping": 0.0}},
                "output": {"keep_full_matrix": True, "self_influence": True},
            },
        ).headers["location"],
    )
    assert job["state"] == "succeeded", job
    results = client.get(f"/v1/influence-jobs/{job['id']}/results").json()
    assert results["details"]["objective_grad_norm"] < 1e-4, "L-BFGS on the service must reach the optimum"
    problem = library_problem(integration_settings, client, model, train, test, queries)
    want = REGISTRY["if_exact"].attribute(problem, REGISTRY["if_exact"].Params(), want_self_influence=True)
    np.testing.assert_allclose(scores(client, job["id"]), want.scores, rtol=1e-4, atol=1e-7)


def test_unrolled_methods_refuse_a_model_the_recipe_does_not_reproduce(trained, integration_settings):
    """The service-trained model's weights uploaded as a new model whose recipe claims another seed: the
    replay cannot reproduce them, so a magic job fails with a 422 problem naming /model_id (no scores
    for a run that was never made), while the service-trained original replays."""
    client, train, test, model = trained
    weights = library_problem(integration_settings, client, model, train, test, [0]).weights
    spec = {"name": "digits-mlp-other-seed", "architecture": DIGITS_MLP, "recipe": {**FAST_RECIPE, "seed": 7}}
    response = register_model(client, spec, weights)
    assert response.status_code == 201, response.text
    body = {
        "model_id": response.json()["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": [0],
        "method": {"name": "magic"},
    }
    job = wait(client, submit(client, body).headers["location"])
    assert job["state"] == "failed" and job["error"]["status"] == 422, job
    assert job["error"]["code"] == "estimator-error" and "does not reproduce" in job["error"]["detail"]
    assert [e["pointer"] for e in job["error"]["errors"]] == ["/model_id"]


def test_tracincp_adam_preconditioning_on_a_model_the_service_trained_with_adam(
    trained, integration_settings
):
    """A model trained by the service with Adam: tracincp with adam_preconditioning recovers the moments by
    replaying its recipe in the worker and equals the library call; a second job reuses the cached
    TracIn-RP features and scales."""
    client, train, test, _ = trained
    model = train_digits_model(
        client, train["id"], optimizer="adam", learning_rate=0.003, momentum=0.0, epochs=2
    )
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": [0, 1],
        "method": {"name": "tracincp", "params": {"adam_preconditioning": True, "projection_dim": 64}},
        "output": {"keep_full_matrix": True},
    }
    first = wait(client, submit(client, body).headers["location"])
    assert first["state"] == "succeeded", first
    second = wait(client, submit(client, {**body, "query_indices": [2]}).headers["location"])
    assert second["state"] == "succeeded", second
    details = client.get(f"/v1/influence-jobs/{second['id']}/results").json()["details"]
    assert details["train_state"]["cache_hit"] is True and details["warnings"] == []
    problem = library_problem(integration_settings, client, model, train, test, [0, 1])
    want = REGISTRY["tracincp"].attribute(problem, body["method"]["params"])
    np.testing.assert_allclose(scores(client, first["id"]), want.scores, rtol=1e-4, atol=1e-6)
