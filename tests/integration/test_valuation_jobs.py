"""Data valuation and retraining-based influence through the API, on the real worker."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.flows import scores, submit, train_cancer_model, wait

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cancer(api_server, integration_env, tmp_path_factory):

    from tests.conftest import WorkerProcess

    worker = WorkerProcess(integration_env, tmp_path_factory.mktemp("w") / "w.log").start()
    with api_server.client() as client:
        train, test, model = train_cancer_model(client)
        yield client, train, test, model
    worker.stop()


def test_knn_shapley_values_least_valuable_first(cancer):
    client, train, test, model = cancer
    job = wait(
        client,
        submit(
            client,
            {
                "model_id": model["id"],
                "train_dataset_id": train["id"],
                "query_dataset_id": test["id"],
                "method": {"name": "knn_shapley", "params": {"k": 5}},
            },
        ).headers["location"],
    )
    assert job["state"] == "succeeded", job
    page = client.get(f"/v1/influence-jobs/{job['id']}/values", params={"page_size": 10}).json()
    values = [item["value"] for item in page["items"]]
    assert values == sorted(values) and len(values) == 10 and page["next_page_token"]
    top = client.get(
        f"/v1/influence-jobs/{job['id']}/values", params={"order": "desc", "page_size": 1}
    ).json()
    assert top["items"][0]["value"] >= values[-1]
    assert all(item["train_id"] is not None and item["stderr"] == 0.0 for item in page["items"])


def test_loo_job_uses_the_models_recipe(cancer):
    """LOO through the service replays the registered L2 recipe: it agrees with exact-Hessian influence."""
    client, train, test, model = cancer
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": [0, 1, 2],
        "output": {"keep_full_matrix": True},
    }
    loo = wait(client, submit(client, {**body, "method": {"name": "loo"}}).headers["location"], timeout=300)
    assert loo["state"] == "succeeded", loo
    exact = wait(client, submit(client, {**body, "method": {"name": "if_exact"}}).headers["location"])
    from scipy.stats import spearmanr

    a, b = scores(client, loo["id"]), scores(client, exact["id"])
    assert np.mean([spearmanr(a[j], b[j]).statistic for j in range(3)]) > 0.9


@pytest.mark.parametrize(
    "method,params",
    [
        ("downsampling", {"n_masks": 64, "alpha": 0.7}),
        ("banzhaf_msr", {"max_retrains": 64, "tolerance": 0.0}),
    ],
)
def test_retraining_sharded_over_two_workers_equals_one_process(cancer, worker_factory, method, params):
    """Subsets split into shard tasks on two worker processes give exactly the single-task answer."""
    client, train, test, model = cancer
    worker_factory()  # a second worker process beside the module's
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": list(range(40)),
        "method": {"name": method, "params": params},
        "output": {"keep_full_matrix": True},
    }
    whole = wait(client, submit(client, body).headers["location"], timeout=300)
    sharded = wait(
        client,
        # reuse off: the whole job's stored outputs would otherwise serve it without any shard
        submit(
            client, {**body, "execution": {"subsets_per_shard": 16, "reuse_subset_outputs": False}}
        ).headers["location"],
        timeout=300,
    )
    assert whole["state"] == sharded["state"] == "succeeded", (whole, sharded)
    details = client.get(f"/v1/influence-jobs/{sharded['id']}/results").json()["details"]
    assert details["shards"] == 4
    if method == "downsampling":
        np.testing.assert_allclose(scores(client, sharded["id"]), scores(client, whole["id"]), rtol=1e-10)

        def top(job_id) -> np.ndarray:  # (query, train index, score, stderr) of every top-k entry
            items = client.get(f"/v1/influence-jobs/{job_id}/results").json()["items"]
            return np.array(
                [
                    (i["query_index"], e["train_index"], e["score"], e["stderr"])
                    for i in items
                    for e in i["proponents"] + i["opponents"]
                ]
            )

        whole_top = top(whole["id"])
        assert (whole_top[:, 3] > 0).all()  # each score's standard error over the subsets
        np.testing.assert_allclose(top(sharded["id"]), whole_top, rtol=1e-6)
    else:

        def values(job_id) -> np.ndarray:
            items = client.get(f"/v1/influence-jobs/{job_id}/values", params={"page_size": 500}).json()[
                "items"
            ]
            return np.array(sorted((i["train_index"], i["value"], i["stderr"]) for i in items))

        np.testing.assert_allclose(values(sharded["id"]), values(whole["id"]), rtol=1e-10, atol=1e-15)


def test_g_shapley_job_values_equal_the_library_call(cancer, integration_settings):
    """G-Shapley through the service: the single SGD passes start from the model's seeded initialisation;
    its values (with standard errors) equal the library call on the same problem."""
    from app.estimators import REGISTRY
    from tests.integration.flows import library_problem

    client, train, test, model = cancer
    params = {"permutations": 8, "batch": 8, "learning_rate": 0.05}
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "method": {"name": "g_shapley", "params": params},
    }
    job = wait(client, submit(client, body).headers["location"])
    assert job["state"] == "succeeded", job
    items = client.get(f"/v1/influence-jobs/{job['id']}/values", params={"page_size": 500}).json()["items"]
    got = np.zeros(train["n_examples"])
    for item in items:
        got[item["train_index"]] = item["value"]
    model = client.get(f"/v1/models/{model['id']}").json()  # trained: its weights and recipe
    problem = library_problem(
        integration_settings, client, model, train, test, list(range(test["n_examples"]))
    )
    want = REGISTRY["g_shapley"].attribute(problem, params)
    np.testing.assert_allclose(got, want.values, rtol=1e-4, atol=1e-7)
    assert all(item["stderr"] > 0 for item in items[:10])
