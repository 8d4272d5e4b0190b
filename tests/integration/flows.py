"""What a user does over HTTP, as small functions shared by the integration tests."""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from app.estimators import (
    ORIENTATION,
    SIGN_CONVENTION,
    Checkpoint,
    InfluenceProblem,
    TaskSpec,
    get_architecture,
    init_model,
)
from app.problems import PROBLEM_BASE_URI, PROBLEM_TYPES
from app.services.validation import validate_params
from app.storage.artifacts import ArtifactStore

TERMINAL = {"succeeded", "failed", "cancelled"}

DIGITS_MLP = {"name": "mlp", "params": {"in_features": 64, "hidden": [32], "num_classes": 10}}
FAST_RECIPE = {
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "momentum": 0.9,
    "epochs": 8,
    "batch_size": 64,
    "weight_decay": 1e-3,
    "seed": 0,
    "num_checkpoints": 3,
}


def builtin(client: httpx.Client, name: str, split: str = "all") -> dict:
    response = client.post("/v1/datasets/builtin", json={"builtin": name, "split": split})
    assert response.status_code == 201, response.text
    return response.json()


def register_model(
    client: httpx.Client,
    spec: dict,
    weights: dict[str, torch.Tensor] | None = None,
    checkpoints: list[dict[str, torch.Tensor]] = (),
    initial_weights: dict[str, torch.Tensor] | None = None,
) -> httpx.Response:
    files = []
    if weights is not None:
        files.append(("weights", ("w.safetensors", save_tensors(weights), "application/octet-stream")))
    if initial_weights is not None:
        blob = save_tensors(initial_weights)
        files.append(("initial_weights", ("i.safetensors", blob, "application/octet-stream")))
    files += [
        ("checkpoints", (f"c{i}.safetensors", save_tensors(c), "application/octet-stream"))
        for i, c in enumerate(checkpoints)
    ]
    return client.post("/v1/models", data={"spec": json.dumps(spec)}, files=files or None)


def train_cancer_model(client: httpx.Client, name: str = "cancer") -> tuple[dict, dict, dict]:
    """breast_cancer train/test sets and an L2 logistic regression trained on them through the API.

    L-BFGS to the optimum: the same weights every time, which is what the convex checks need.
    """
    train = builtin(client, "sklearn:breast_cancer", "train")
    test = builtin(client, "sklearn:breast_cancer", "test")
    spec = {
        "name": name,
        "architecture": {"name": "linear", "params": {"in_features": 30, "num_classes": 2}},
        "recipe": {
            "optimizer": "lbfgs",
            "learning_rate": 1.0,
            "epochs": 100,
            "weight_decay": 1e-2,
            "num_checkpoints": 1,
        },
        "train_dataset_id": train["id"],
    }
    model = register_model(client, spec).json()
    assert wait(client, f"/v1/training-jobs/{model['training_job_id']}")["state"] == "succeeded"
    return train, test, model


def wait(client: httpx.Client, path: str, timeout: float = 180, states=TERMINAL) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if body.get("state") in states:
            return body
        assert time.monotonic() < deadline, f"{path} stuck in {body.get('state')}: {body}"
        time.sleep(0.2)


def train_digits_model(client: httpx.Client, train_id: str, **recipe) -> dict:
    spec = {
        "name": "digits-mlp",
        "architecture": DIGITS_MLP,
        "recipe": {**FAST_RECIPE, **recipe},
        "train_dataset_id": train_id,
    }
    response = register_model(client, spec)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["state"] == "training"
    job = wait(client, f"/v1/training-jobs/{model['training_job_id']}")
    assert job["state"] == "succeeded", job
    return client.get(f"/v1/models/{model['id']}").json()


def submit(client: httpx.Client, body: dict, **headers) -> httpx.Response:
    return client.post("/v1/influence-jobs", json=body, headers=headers)


def scores(client: httpx.Client, job_id: str) -> np.ndarray:
    """The job's score matrix as .npy, checked against its streamed safetensors download."""
    url = f"/v1/influence-jobs/{job_id}/artifacts/scores"
    response = client.get(url)
    assert response.status_code == 200, response.text
    matrix = np.load(io.BytesIO(response.content), allow_pickle=False)
    streamed = client.get(url, params={"format": "safetensors"})
    assert streamed.status_code == 200 and int(streamed.headers["content-length"]) == len(streamed.content)
    assert streamed.headers["content-disposition"].endswith('-scores.safetensors"')
    np.testing.assert_array_equal(load_numpy(streamed.content)["scores"], matrix)
    header = json.loads(streamed.content[8 : 8 + int.from_bytes(streamed.content[:8], "little")])
    assert header["__metadata__"] == {"orientation": ORIENTATION, "sign_convention": SIGN_CONVENTION}
    return matrix


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status
    assert body["code"] in PROBLEM_TYPES and status in PROBLEM_TYPES[body["code"]].statuses, body
    assert body["type"] == PROBLEM_BASE_URI + body["code"]
    if code is not None:
        assert body["code"] == code, body
    return body


def library_problem(settings, client, model, train, test, query_indices, measurement="loss"):
    """The job's problem loaded straight from the artifact store, for calling the library directly."""
    store = ArtifactStore(settings.resolved_artifact_dir)
    arch = get_architecture(model["architecture"])
    module = init_model(arch, validate_params(arch.Params, model["architecture_params"], ""), seed=0)
    tr, te = store.load_npz(train["uri"]), store.load_npz(test["uri"])
    ckpts = client.get(f"/v1/models/{model['id']}/checkpoints").json()["items"]
    return InfluenceProblem(
        model=module,
        task=TaskSpec(),
        weights=load_file(str(store.path(model["weights_uri"]))),
        train_x=torch.as_tensor(tr["X"]),
        train_y=torch.as_tensor(tr["y"]),
        query_x=torch.as_tensor(te["X"][query_indices]),
        query_y=torch.as_tensor(te["y"][query_indices]),
        measurement=measurement,
        weight_decay=model["recipe"]["weight_decay"],
        checkpoints=[
            Checkpoint(c["step"], c["learning_rate"], load_file(str(store.path(c["uri"])))) for c in ckpts
        ],
        recipe=model["recipe"],
        initial_weights=(
            load_file(str(store.path(model["initial_weights_uri"]))) if model["initial_weights_uri"] else None
        ),
    )
