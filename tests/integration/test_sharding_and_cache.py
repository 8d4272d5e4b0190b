"""Fan-out over shard tasks on two worker processes equals the single-task run; train-side state is reused."""

from __future__ import annotations

import numpy as np
import pytest

from app.estimators import init_model
from tests.integration.flows import (
    builtin,
    register_model,
    scores,
    submit,
    train_cancer_model,
    train_digits_model,
    wait,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(api_server, integration_env, tmp_path_factory):

    from tests.conftest import WorkerProcess

    workers = [
        WorkerProcess(integration_env, tmp_path_factory.mktemp("w") / f"w{i}.log").start() for i in range(2)
    ]
    with api_server.client() as client:
        train = builtin(client, "sklearn:digits", "train")
        test = builtin(client, "sklearn:digits", "test")
        model = train_digits_model(client, train["id"])
        yield client, train, test, model
    for worker in workers:
        worker.stop()


def _run(client, body) -> dict:
    job = wait(client, submit(client, body).headers["location"], timeout=300)
    assert job["state"] == "succeeded", job
    return job


FASTIF = {"damping": 0.3, "scale": 20.0, "depth": 200, "k_candidates": 100}  # candidates straddle shards


# what the worker adds to a single task's details besides the estimator's metadata
RUNNER_DETAILS = {
    "compute_seconds",
    "device",
    "chunk_size",
    "model_weights_sha256",
    "train_dataset_sha256",
    "n_checkpoints",
    "torch_version",
    "train_state",
}


@pytest.mark.parametrize(
    ("method", "params"), [("tracincp", {}), ("grad_dot", {}), ("fastif", FASTIF), ("datainf", {})]
)
def test_sharded_equals_unsharded(setup, method, params):
    client, train, test, model = setup
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": list(range(12)),
        "method": {"name": method, "params": params},
        "output": {"top_k": 5, "keep_full_matrix": True, "self_influence": True},
    }
    whole = _run(client, body)
    sharded = _run(client, {**body, "execution": {"train_shard_size": 500, "shard_by_checkpoint": True}})
    n_checkpoint_groups = 3 if method == "tracincp" else 1
    assert whole["spec"]["execution"]["train_shard_size"] is None
    results = client.get(f"/v1/influence-jobs/{sharded['id']}/results").json()
    assert results["details"]["shards"] == 3 * n_checkpoint_groups  # 1437 rows / 500 per shard
    np.testing.assert_allclose(
        scores(client, sharded["id"]), scores(client, whole["id"]), rtol=1e-5, atol=1e-7
    )
    self_whole = client.get(f"/v1/influence-jobs/{whole['id']}/artifacts/self-influence").content
    self_sharded = client.get(f"/v1/influence-jobs/{sharded['id']}/artifacts/self-influence").content
    import io

    np.testing.assert_allclose(np.load(io.BytesIO(self_sharded)), np.load(io.BytesIO(self_whole)), rtol=1e-5)
    whole_results = client.get(f"/v1/influence-jobs/{whole['id']}/results").json()
    whole_items = whole_results["items"]
    metadata = set(whole_results["details"]) - RUNNER_DETAILS  # the estimator's: reported when sharded too
    assert metadata <= set(results["details"]), metadata - set(results["details"])
    assert results["details"].get("warnings") == whole_results["details"].get("warnings")
    if method == "datainf":  # its layer-size warning (digits MLP layers are large)
        assert results["details"]["warnings"]
    assert [[p["train_index"] for p in i["proponents"]] for i in results["items"]] == [
        [p["train_index"] for p in i["proponents"]] for i in whole_items
    ]


def test_train_state_is_cached_and_sharded_if_exact_matches(setup):
    """if_exact's Cholesky factor is fitted once; later jobs (new queries, or sharded) reuse it."""
    client, _, _, _ = setup
    train, test, model = train_cancer_model(client)
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "method": {"name": "if_exact", "params": {"damping": 0.0013}},  # no other test fits this state
        "output": {"keep_full_matrix": True},
    }
    first = _run(client, {**body, "query_indices": [0, 1, 2]})
    second = _run(client, {**body, "query_indices": [3, 4, 5, 6]})
    d1 = client.get(f"/v1/influence-jobs/{first['id']}/results").json()["details"]["train_state"]
    d2 = client.get(f"/v1/influence-jobs/{second['id']}/results").json()["details"]["train_state"]
    assert d1["cache_hit"] is False and d2["cache_hit"] is True and d1["key"] == d2["key"]
    # The second job loaded the first job's factor instead of fitting: same recorded fit, plus a load time.
    assert d2["fit_seconds"] == d1["fit_seconds"] and "load_seconds" in d2 and "load_seconds" not in d1
    other_damping = _run(
        client, {**body, "query_indices": [0], "method": {"name": "if_exact", "params": {"damping": 0.01}}}
    )
    d3 = client.get(f"/v1/influence-jobs/{other_damping['id']}/results").json()["details"]["train_state"]
    assert d3["cache_hit"] is False and d3["key"] != d1["key"]

    sharded = _run(client, {**body, "query_indices": [0, 1, 2], "execution": {"train_shard_size": 100}})
    np.testing.assert_allclose(
        scores(client, sharded["id"]), scores(client, first["id"]), rtol=1e-6, atol=1e-9
    )


def test_unrolled_replay_is_cached_and_runs_as_one_task(setup):
    """magic's replay of the service's training run is fitted once and reused by a job with new queries;
    a request to shard it by training rows runs as one task (one backward sweep scores every row)
    with the same scores."""
    client, train, test, model = setup
    body = {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "method": {"name": "magic", "params": {"segment_length": 10}},  # no other test fits this state
        "output": {"keep_full_matrix": True},
    }
    first = _run(client, {**body, "query_indices": [0, 1, 2]})
    second = _run(client, {**body, "query_indices": [3, 4], "execution": {"train_shard_size": 500}})
    r1 = client.get(f"/v1/influence-jobs/{first['id']}/results").json()
    r2 = client.get(f"/v1/influence-jobs/{second['id']}/results").json()
    d1, d2 = r1["details"]["train_state"], r2["details"]["train_state"]
    assert d1["cache_hit"] is False and d2["cache_hit"] is True and d1["key"] == d2["key"]
    assert r2["details"].get("shards") in (None, 0, 1)
    assert r1["details"]["replay_error"] < 1e-4 and r1["details"]["steps"] == 8 * 23
    both = _run(client, {**body, "query_indices": [0, 1, 2, 3, 4]})
    np.testing.assert_allclose(
        scores(client, both["id"]),
        np.vstack([scores(client, first["id"]), scores(client, second["id"])]),
        rtol=1e-5,
        atol=1e-8,
    )


def test_the_same_checkpoint_files_at_other_steps_fit_their_own_state(setup):
    """SOURCE's state records its checkpoint steps: a second model with the same files at other steps
    must miss the cache and fit its own segments, not hit the first model's state and be refused."""
    client, train, _, _ = setup
    linear = {"name": "linear", "params": {"in_features": 64, "num_classes": 10}}
    states = [init_model("linear", linear["params"], seed=s).state_dict() for s in range(3)]
    results = []
    for steps in ((10, 20), (5, 20)):
        spec = {
            "name": f"source-steps-{steps[0]}",
            "architecture": linear,
            "checkpoints": [{"step": s, "learning_rate": 0.1} for s in steps],
        }
        model = register_model(client, spec, weights=states[0], checkpoints=states[1:])
        assert model.status_code == 201, model.text
        body = {
            "model_id": model.json()["id"],
            "train_dataset_id": train["id"],
            "query_indices": [0, 1],
            "method": {"name": "source", "params": {"damping": 0.0017}},  # no other test fits this state
        }
        job = _run(client, body)
        results.append(client.get(f"/v1/influence-jobs/{job['id']}/results").json()["details"]["train_state"])
    assert results[0]["cache_hit"] is False and results[1]["cache_hit"] is False
    assert results[0]["key"] != results[1]["key"]
