"""Group influence through the API: output.groups on a job, scored by the worker, served per query.

First order equals the sums of the job's own score matrix (also when the job fans out into shards);
second and newton order equal calling the library on the same stored model and data.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from app.estimators import REGISTRY
from tests.integration.flows import (
    assert_problem,
    library_problem,
    scores,
    submit,
    train_cancer_model,
    wait,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cancer(api_server, integration_env, tmp_path_factory):
    from tests.conftest import WorkerProcess

    worker = WorkerProcess(integration_env, tmp_path_factory.mktemp("w") / "worker.log").start()
    with api_server.client() as client:
        train, test, model = train_cancer_model(client, name="cancer-groups")
        yield client, train, test, client.get(f"/v1/models/{model['id']}").json()
    worker.stop()


def _groups(n_train: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    sizes = {"tiny": 3, "small": 20, "tenth": n_train // 10, "quarter": n_train // 4}
    return {name: sorted(rng.choice(n_train, size=k, replace=False).tolist()) for name, k in sizes.items()}


def _body(model, train, test, method, groups, order="first", **extra) -> dict:
    return {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": test["id"],
        "query_indices": [0, 3, 7, 11, 19],
        "method": method,
        "output": {"keep_full_matrix": True, "groups": {"members": groups, "order": order}},
        **extra,
    }


def _run(client, body) -> dict:
    job = wait(client, submit(client, body).headers["location"], timeout=300)
    assert job["state"] == "succeeded", job
    return job


def _group_matrix(client, job_id: str) -> tuple[dict, np.ndarray]:
    page = client.get(f"/v1/influence-jobs/{job_id}/group-influence", params={"page_size": 2}).json()
    rows, first = [], page
    while True:
        rows += [item["scores"] for item in page["items"]]
        if "next_page_token" not in page:  # absent on the last page
            break
        page = client.get(
            f"/v1/influence-jobs/{job_id}/group-influence",
            params={"page_size": 2, "page_token": page["next_page_token"]},
        ).json()
    return first, np.asarray(rows)


def test_first_order_groups_are_sums_of_the_scores_also_when_sharded(cancer):
    client, train, test, model = cancer
    groups = _groups(train["n_examples"])
    body = _body(model, train, test, {"name": "grad_dot"}, groups)
    whole, sharded = _run(client, body), _run(client, {**body, "execution": {"train_shard_size": 150}})
    n_shards = -(-train["n_examples"] // 150)
    assert client.get(f"/v1/influence-jobs/{sharded['id']}/results").json()["details"]["shards"] == n_shards
    for job in (whole, sharded):
        page, matrix = _group_matrix(client, job["id"])
        full = scores(client, job["id"])
        want = np.stack([full[:, rows].sum(1) for rows in groups.values()], 1)
        np.testing.assert_allclose(matrix, want, rtol=1e-5, atol=1e-9)
        assert page["order"] == "first" and page["sign_convention"].startswith("positive = proponent")
        assert [g["name"] for g in page["groups"]] == list(groups)
        assert [g["size"] for g in page["groups"]] == [len(r) for r in groups.values()]
        assert [i["query_row"] for i in page["items"]] == [0, 3]
        raw = client.get(f"/v1/influence-jobs/{job['id']}/artifacts/group-scores").content
        np.testing.assert_allclose(np.load(io.BytesIO(raw)), matrix, rtol=1e-12)


@pytest.mark.parametrize(
    ("estimator", "order"), [("if_exact", "second"), ("if_exact", "newton"), ("if_cg", "second")]
)
def test_hessian_orders_equal_the_library(cancer, integration_settings, estimator, order):
    client, train, test, model = cancer
    groups = _groups(train["n_examples"])
    method = {"name": estimator, "params": {"damping": 0.001}}
    job = _run(client, _body(model, train, test, method, groups, order))
    _, matrix = _group_matrix(client, job["id"])
    problem = library_problem(integration_settings, client, model, train, test, [0, 3, 7, 11, 19])
    want = REGISTRY[estimator].group_scores(problem, method["params"], list(groups.values()), order)
    np.testing.assert_allclose(matrix, want, rtol=1e-4, atol=1e-8)
    first = np.stack([scores(client, job["id"])[:, r].sum(1) for r in groups.values()], 1)
    assert not np.allclose(matrix[:, -1], first[:, -1], rtol=1e-3)  # the quarter's interactions count


def test_hessian_orders_with_a_split_lds_evaluation_run_as_one_task(cancer):
    """LDS subsets split over shards would fan the job out, and a merge has no Hessian-order group
    scores: the job runs as one task instead, with the same groups and its LDS."""
    client, train, test, model = cancer
    groups = _groups(train["n_examples"])
    method = {"name": "if_exact", "params": {"damping": 0.001}}
    plain = _run(client, _body(model, train, test, method, groups, "second"))
    extra = {"evaluation": {"lds": {"n_masks": 6}}, "execution": {"subsets_per_shard": 2}}
    evaluated = _run(client, _body(model, train, test, method, groups, "second", **extra))
    details = client.get(f"/v1/influence-jobs/{evaluated['id']}/results").json()["details"]
    assert not details.get("shards") and len(details["quality"]["lds"]["per_query"]) == 5
    np.testing.assert_allclose(
        _group_matrix(client, evaluated["id"])[1], _group_matrix(client, plain["id"])[1], rtol=1e-10
    )


def test_groups_are_validated_at_submit(cancer):
    client, train, test, model = cancer
    catalog = {e["name"]: e["group_orders"] for e in client.get("/v1/estimators").json()}
    assert catalog["if_exact"] == catalog["if_cg"] == ["first", "second", "newton"]
    assert catalog["grad_dot"] == ["first"]
    assert catalog["tmc_shapley"] == []
    n = train["n_examples"]
    cases = [
        ({"name": "grad_dot"}, {"a/b": [0, n]}, "first", {}, "/output/groups/members/a~1b"),
        ({"name": "grad_dot"}, {"a": [1, 1]}, "first", {}, "/output/groups/members/a"),
        ({"name": "grad_dot"}, {"a": []}, "first", {}, "/output/groups/members/a"),
        ({"name": "grad_dot"}, {"a": [1]}, "second", {}, "/output/groups/order"),
        (
            {"name": "if_exact"},
            {"a": [1]},
            "newton",
            {"execution": {"train_shard_size": 100}},
            "/execution/train_shard_size",
        ),
    ]
    for method, groups, order, extra, pointer in cases:
        body = assert_problem(submit(client, _body(model, train, test, method, groups, order, **extra)), 422)
        assert pointer in [e["pointer"] for e in body["errors"]], body
    valuation = _body(model, train, test, {"name": "knn_shapley"}, {"a": [1]})
    body = assert_problem(submit(client, valuation), 422)
    assert "/output/groups" in [e["pointer"] for e in body["errors"]], body
    no_groups = _run(client, {**_body(model, train, test, {"name": "grad_dot"}, {"a": [1]}), "output": {}})
    missing = client.get(f"/v1/influence-jobs/{no_groups['id']}/group-influence")
    assert_problem(missing, 404, "no-group-scores")


def test_checkpoints_without_learning_rates_are_not_given_a_default_one(cancer):
    """Uploaded checkpoints with no learning rate, on a model without a recipe: TracInCP refuses
    (naming the parameter) instead of weighing each by the Recipe default 0.1; without the weights
    it runs."""
    from app.estimators import init_model
    from tests.integration.flows import register_model

    client, train, test, _ = cancer
    linear = {"name": "linear", "params": {"in_features": 30, "num_classes": 2}}
    states = [init_model("linear", linear["params"], seed=s).state_dict() for s in range(3)]
    spec = {"name": "no-rates", "architecture": linear, "checkpoints": [{"step": 1}, {"step": 2}]}
    model = register_model(client, spec, weights=states[0], checkpoints=states[1:])
    assert model.status_code == 201, model.text
    body = {"model_id": model.json()["id"], "train_dataset_id": train["id"], "query_indices": [0, 1]}
    failed = wait(client, submit(client, {**body, "method": {"name": "tracincp"}}).headers["location"])
    assert failed["state"] == "failed", failed
    assert failed["error"]["errors"][0]["pointer"] == "/method/params/use_checkpoint_learning_rates"
    unweighted = {"name": "tracincp", "params": {"use_checkpoint_learning_rates": False}}
    _run(client, {**body, "method": unweighted})
