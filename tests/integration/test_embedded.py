"""The zero-setup default: ``influence serve`` on SQLite + the filesystem broker + its own worker."""

from __future__ import annotations

import pytest

from tests.conftest import ServerProcess
from tests.integration.flows import builtin, scores, submit, train_digits_model, wait

pytestmark = pytest.mark.integration


def test_embedded_profile_end_to_end(tmp_path):
    env = {"IA_DATA_DIR": str(tmp_path / "ia"), "IA_HEARTBEAT_SECONDS": "0.5", "IA_TORCH_THREADS": "1"}
    for key in ("IA_DATABASE_URL", "IA_BROKER_URL", "IA_ARTIFACT_DIR"):
        env[key] = ""
    server = ServerProcess(env, tmp_path / "serve.log").wait_ready()
    try:
        with server.client() as client:
            assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
            train = builtin(client, "sklearn:digits", "train")
            test = builtin(client, "sklearn:digits", "test")
            model = train_digits_model(client, train["id"])
            job = wait(
                client,
                submit(
                    client,
                    {
                        "model_id": model["id"],
                        "train_dataset_id": train["id"],
                        "query_dataset_id": test["id"],
                        "query_indices": [0, 1, 2],
                        "method": {"name": "tracincp"},
                        "output": {"keep_full_matrix": True, "top_k": 3},
                    },
                ).headers["location"],
            )
            assert job["state"] == "succeeded", job
            assert scores(client, job["id"]).shape == (3, train["n_examples"])
            items = client.get(f"/v1/influence-jobs/{job['id']}/results").json()["items"]
            assert len(items) == 3 and len(items[0]["proponents"]) == 3
    finally:
        server.stop()
    assert (tmp_path / "ia" / "ia.db").exists()
