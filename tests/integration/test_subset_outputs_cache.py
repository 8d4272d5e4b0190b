"""Stored retraining outputs through the API on a real worker: Datamodels' subsets serve Downsampling
and the LDS evaluation of other estimators without retraining."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.flows import assert_problem, scores, submit, train_cancer_model, wait

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cancer(api_server, integration_env, tmp_path_factory):
    from tests.conftest import WorkerProcess

    worker = WorkerProcess(integration_env, tmp_path_factory.mktemp("w") / "w.log").start()
    with api_server.client() as client:
        train, test, model = train_cancer_model(client, "cancer-subsets")
        body = {
            "model_id": model["id"],
            "train_dataset_id": train["id"],
            "query_dataset_id": test["id"],
            "query_indices": list(range(10)),
            "output": {"keep_full_matrix": True},
        }
        yield client, body
    worker.stop()


def _run(client, body) -> tuple[dict, dict]:
    job = wait(client, submit(client, body).headers["location"], timeout=300)
    assert job["state"] == "succeeded", job
    return job, client.get(f"/v1/influence-jobs/{job['id']}/results").json()["details"]


def _shards(settings, job_id: str) -> int:
    from sqlalchemy import func, select

    from app.db.models import JobShard
    from app.db.session import session_scope

    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(JobShard).where(JobShard.job_id == job_id))


def _entry(settings, key: str) -> dict[str, np.ndarray]:
    """The stored artifact of a cache entry, read the way a user of the DB and store would."""
    from app.db.models import TrainStateEntry
    from app.db.session import session_scope
    from app.storage.artifacts import ArtifactStore

    with session_scope(settings) as session:
        entry = session.get(TrainStateEntry, key)
        assert entry is not None and entry.estimator == "subset-outputs"
        uri = entry.uri
    return ArtifactStore(settings.resolved_artifact_dir).load_npz(uri)


def test_downsampling_reuses_datamodels_outputs(cancer, integration_settings):
    client, body = cancer
    plan = {"n_masks": 40, "alpha": 0.5, "seed": 3}
    dm, dm_details = _run(
        client,
        {
            **body,
            "method": {"name": "datamodels", "params": {**plan, "regression": "ridge"}},
            # the same subsets as the method's own: evaluated without a second retraining
            "evaluation": {"lds": plan},
        },
    )
    key = dm_details["subset_outputs_key"]
    assert dm_details["subset_outputs"] == "trained" and dm_details["models_trained"] == 40
    assert dm_details["quality"]["lds"]["subset_outputs_key"] == key
    assert dm_details["quality"]["lds"]["n_masks"] == 40

    # Same plan, another method, and sharding asked for: nothing is retrained, no shard fans out.
    ds, ds_details = _run(
        client,
        {
            **body,
            "method": {"name": "downsampling", "params": plan},
            "execution": {"subsets_per_shard": 10},
        },
    )
    assert ds_details["subset_outputs"] == "reused" and ds_details["subset_outputs_key"] == key
    assert ds_details["models_trained"] == 0 and "shards" not in ds_details
    assert ds_details["n_retrains"] == 40  # the models the reused outputs came from
    assert _shards(integration_settings, ds["id"]) == 0

    # The same job without reuse retrains, and its scores are the reused job's, number for number.
    fresh, fresh_details = _run(
        client,
        {
            **body,
            "method": {"name": "downsampling", "params": plan},
            "execution": {"reuse_subset_outputs": False},
        },
    )
    assert fresh_details["subset_outputs"] == "trained" and fresh_details["models_trained"] == 40
    assert fresh_details["subset_outputs_key"] == key
    np.testing.assert_array_equal(scores(client, ds["id"]), scores(client, fresh["id"]))
    stored = _entry(integration_settings, key)
    assert stored["masks"].shape == (40, stored["masks"].shape[1]) and stored["query"].shape == (40, 10)

    # Memorisation needs the training-set outputs the stored entry lacks: it trains (in shards here)
    # and stores its own entry, which then also serves query-only jobs.
    mem_body = {
        **body,
        "method": {"name": "downsampling", "params": plan},
        "output": {"keep_full_matrix": True, "self_influence": True},
    }
    mem, mem_details = _run(client, {**mem_body, "execution": {"subsets_per_shard": 20}})
    assert mem_details["subset_outputs"] == "trained" and mem_details["subset_outputs_key"] != key
    assert mem_details["shards"] == 2
    np.testing.assert_allclose(scores(client, mem["id"]), scores(client, fresh["id"]), rtol=1e-9, atol=1e-12)
    memorisation = client.get(f"/v1/influence-jobs/{mem['id']}/artifacts/self-influence")
    assert memorisation.status_code == 200
    again, again_details = _run(client, mem_body)
    assert again_details["subset_outputs"] == "reused"
    assert again_details["subset_outputs_key"] == mem_details["subset_outputs_key"]
    assert client.get(f"/v1/influence-jobs/{again['id']}/artifacts/self-influence").content == (
        memorisation.content
    )


def test_lds_evaluation_of_other_estimators(cancer, integration_settings):
    from app.estimators.valuation import lds

    client, body = cancer
    evaluation = {"lds": {"n_masks": 30, "alpha": 0.5, "seed": 11}}
    # if_exact runs as one shard; the LDS subsets retrain in three more; finalize evaluates.
    exact, d1 = _run(
        client,
        {
            **body,
            "method": {"name": "if_exact", "params": {"damping": 0.002}},
            "evaluation": evaluation,
            "execution": {"subsets_per_shard": 10},
        },
    )
    q1 = d1["quality"]["lds"]
    assert q1["subset_outputs"] == "trained" and d1["shards"] == 4
    stored = _entry(integration_settings, q1["subset_outputs_key"])
    expected = lds(scores(client, exact["id"]), stored["masks"], stored["query"])
    np.testing.assert_allclose(q1["per_query"], expected, rtol=1e-9, atol=1e-12)
    assert q1["mean"] == pytest.approx(float(np.nanmean(expected)))
    assert q1["n_queries"] == 10 and q1["n_masks"] == 30 and q1["stderr"] > 0
    assert q1["mean"] > 0.3  # influence functions predict retraining on a convex model

    # Another estimator, same plan: the stored outputs serve, nothing retrains (one task, no shards).
    dot, d2 = _run(client, {**body, "method": {"name": "grad_dot"}, "evaluation": evaluation})
    q2 = d2["quality"]["lds"]
    assert q2["subset_outputs"] == "reused" and q2["subset_outputs_key"] == q1["subset_outputs_key"]
    assert _shards(integration_settings, dot["id"]) == 0
    expected = lds(scores(client, dot["id"]), stored["masks"], stored["query"])
    np.testing.assert_allclose(q2["per_query"], expected, rtol=1e-9, atol=1e-12)

    # A new plan on a job that runs as one task: its compute child retrains the subsets after scoring.
    held_out = {"lds": {"n_masks": 12, "alpha": 0.5, "seed": 12}}
    single, d3 = _run(client, {**body, "method": {"name": "grad_dot"}, "evaluation": held_out})
    q3 = d3["quality"]["lds"]
    assert q3["subset_outputs"] == "trained" and q3["subset_outputs_key"] != q1["subset_outputs_key"]
    stored = _entry(integration_settings, q3["subset_outputs_key"])
    assert stored["masks"].shape[0] == 12
    expected = lds(scores(client, single["id"]), stored["masks"], stored["query"])
    np.testing.assert_allclose(q3["per_query"], expected, rtol=1e-9, atol=1e-12)


def test_lds_refused_for_valuation_methods(cancer):
    client, body = cancer
    refused = assert_problem(
        submit(
            client,
            {
                **body,
                "method": {"name": "banzhaf_msr", "params": {"max_retrains": 8}},
                "evaluation": {"lds": {"n_masks": 8}},
            },
        ),
        422,
        "evaluation-unsupported",
    )
    assert [e["pointer"] for e in refused["errors"]] == ["/evaluation/lds"]
    few = assert_problem(
        submit(client, {**body, "method": {"name": "grad_dot"}, "evaluation": {"lds": {"n_masks": 2}}}), 422
    )
    assert [e["pointer"] for e in few["errors"]] == ["/evaluation/lds/n_masks"]
    recipe = assert_problem(
        submit(
            client,
            {**body, "method": {"name": "grad_dot"}, "evaluation": {"lds": {"recipe": {"epochs": 0}}}},
        ),
        422,
    )
    assert [e["pointer"] for e in recipe["errors"]] == ["/evaluation/lds/recipe/epochs"]
