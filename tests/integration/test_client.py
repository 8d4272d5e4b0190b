"""The Python client (app/client.py) against the real API process and a real worker.

Arrays go in (npz datasets, safetensors weights from a state dict) and come out (the score matrix),
problem answers become APIError, and the results equal the estimator library called on the same
arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from app.client import APIError, InfluenceClient, JobFailed
from app.estimators import (
    Checkpoint,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)

pytestmark = pytest.mark.integration

ARCH = {"name": "mlp", "params": {"in_features": 64, "hidden": [16], "num_classes": 10}}
N_TRAIN, N_QUERY = 200, 12


@pytest.fixture(scope="module")
def ia(api_server, integration_env, tmp_path_factory):
    from tests.conftest import WorkerProcess

    worker = WorkerProcess(integration_env, tmp_path_factory.mktemp("w") / "worker.log").start()
    with InfluenceClient(api_server.url, api_server.api_key) as client:
        yield client
    worker.stop()


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return X[:N_TRAIN], y[:N_TRAIN], X[1000 : 1000 + N_QUERY], y[1000 : 1000 + N_QUERY]


@pytest.fixture(scope="module")
def trained(digits):
    """An MLP trained here, with two checkpoints, as a notebook user would have it."""
    x, y, _, _ = digits
    net = init_model(ARCH["name"], ARCH["params"], seed=0)
    recipe = Recipe(learning_rate=0.1, epochs=5, batch_size=32, weight_decay=1e-3, num_checkpoints=2)
    res = train(
        net, TaskSpec("classification", "cross_entropy"), torch.from_numpy(x), torch.from_numpy(y), recipe
    )
    return net, res


def test_upload_register_submit_wait_and_read_back(ia, digits, trained):
    x, y, qx, qy = digits
    net, res = trained
    train_set = ia.upload_dataset(x, y, name="client-train")
    query_set = ia.upload_dataset(qx, qy, name="client-query", ids=np.arange(5000, 5000 + N_QUERY))
    assert train_set["n_examples"] == N_TRAIN and query_set["n_examples"] == N_QUERY
    assert train_set["id"] in {d["id"] for d in ia.datasets()}  # walks every page
    model = ia.register_model(
        "client-mlp",
        ARCH,
        weights=res.weights,
        checkpoints=[c.state for c in res.checkpoints],
        checkpoint_info=[{"step": c.step, "learning_rate": c.learning_rate} for c in res.checkpoints],
    )
    assert model["state"] == "ready"

    key = "client-test-submit"
    job = ia.submit_job(
        model["id"],
        train_set["id"],
        "tracincp",
        query_dataset_id=query_set["id"],
        output={"top_k": 3, "keep_full_matrix": True, "self_influence": True},
        idempotency_key=key,
    )
    again = ia.submit_job(
        model["id"],
        train_set["id"],
        "tracincp",
        query_dataset_id=query_set["id"],
        output={"top_k": 3, "keep_full_matrix": True, "self_influence": True},
        idempotency_key=key,
    )
    assert again["id"] == job["id"]  # a retried submission is the same job
    done = ia.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded"

    scores = ia.scores(job["id"])
    self_influence = ia.self_influence(job["id"])
    assert scores.shape == (N_QUERY, N_TRAIN) and self_influence.shape == (N_TRAIN,)
    problem = InfluenceProblem(
        model=init_model(ARCH["name"], ARCH["params"]),
        task=TaskSpec("classification", "cross_entropy"),
        weights=res.weights,
        train_x=torch.from_numpy(x),
        train_y=torch.from_numpy(y),
        query_x=torch.from_numpy(qx),
        query_y=torch.from_numpy(qy),
        checkpoints=[Checkpoint(c.step, c.learning_rate, c.state) for c in res.checkpoints],
        weight_decay=1e-3,
    )
    want = get_estimator("tracincp").attribute(problem, {}, want_self_influence=True, runtime=Runtime())
    np.testing.assert_allclose(scores, want.scores, rtol=1e-4, atol=1e-6 * np.abs(want.scores).max())
    np.testing.assert_allclose(self_influence, want.self_influence, rtol=1e-4)

    rows = list(ia.results(job["id"]))
    assert [r["query_index"] for r in rows] == list(range(N_QUERY))
    assert [r["query_id"] for r in rows] == list(range(5000, 5000 + N_QUERY))
    for r in rows:
        assert r["proponents"][0]["train_index"] == int(np.argmax(scores[r["query_index"]]))
    page = ia.results_page(job["id"], page_size=5)
    assert page["orientation"] and page["sign_convention"] and len(page["items"]) == 5
    assert job["id"] in {j["id"] for j in ia.jobs(model_id=model["id"], state="succeeded")}


def test_problems_become_api_errors(ia, digits):
    x, y, _, _ = digits
    with pytest.raises(APIError) as info:
        ia.submit_job("no-such-model", "no-such-dataset", "tracincp")
    assert info.value.status in (404, 422) and info.value.code
    train_set = ia.upload_dataset(x[:20], y[:20])
    model = ia.register_model(
        "client-tiny", ARCH, weights=init_model(ARCH["name"], ARCH["params"]).state_dict()
    )
    with pytest.raises(APIError) as info:
        ia.submit_job(model["id"], train_set["id"], {"name": "no_such_estimator"})
    assert info.value.status == 422 and "/method/name" in [e["pointer"] for e in info.value.errors]
    job = ia.wait(ia.submit_job(model["id"], train_set["id"], "grad_dot", query_indices=[0])["id"])
    with pytest.raises(APIError) as info:
        ia.cancel(job["id"])  # it already succeeded
    assert info.value.status == 409
    with pytest.raises(APIError) as info:
        ia.scores(job["id"])  # not kept
    assert info.value.code == "artifact-not-kept"
    values = ia.wait(ia.submit_job(model["id"], train_set["id"], "knn_shapley", query_indices=[0, 1])["id"])
    ranked = list(ia.values(values["id"], order="desc"))
    assert len(ranked) == 20 and ranked[0]["value"] >= ranked[-1]["value"]
    with pytest.raises(JobFailed):
        nan = ia.register_model(
            "client-nan",
            ARCH,
            weights={k: v * 1e30 for k, v in init_model(ARCH["name"], ARCH["params"]).state_dict().items()},
        )
        ia.wait(ia.submit_job(nan["id"], train_set["id"], "grad_dot", query_indices=[0])["id"], timeout=120)


def test_a_model_trained_on_the_service(ia, digits):
    x, y, _, _ = digits
    train_set = ia.upload_dataset(x, y)
    recipe = {"optimizer": "sgd", "learning_rate": 0.1, "epochs": 2, "batch_size": 64, "num_checkpoints": 1}
    model = ia.register_model("client-trained", ARCH, recipe=recipe, train_dataset_id=train_set["id"])
    assert model["state"] == "training"
    ready = ia.wait_model(model["id"], timeout=300)
    assert ready["state"] == "ready" and ready["id"] == model["id"]
    start = {k: 0.5 * v for k, v in init_model(ARCH["name"], ARCH["params"], 7).state_dict().items()}
    tuned = ia.register_model(
        "client-fine-tuned", ARCH, recipe=recipe, train_dataset_id=train_set["id"], initial_weights=start
    )
    assert tuned["state"] == "training" and tuned["initial_weights_sha256"] is not None
    assert ia.wait_model(tuned["id"], timeout=300)["state"] == "ready"
