"""Hostile and broken uploads get a 4xx problem+json and leave nothing behind (no row, no file)."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors

from app.estimators import init_model
from tests.integration.flows import DIGITS_MLP, assert_problem, builtin, register_model, submit

pytestmark = pytest.mark.integration


class Payload:
    """Unpickling this creates a marker file: proof that user bytes were executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _snapshot(client, settings) -> tuple:
    root = settings.resolved_artifact_dir
    files = sorted(p for p in root.rglob("*") if p.is_file())
    datasets = [d["id"] for d in client.get("/v1/datasets", params={"page_size": 500}).json()["items"]]
    models = [m["id"] for m in client.get("/v1/models", params={"page_size": 500}).json()["items"]]
    return files, datasets, models


@pytest.fixture
def unchanged(client, integration_settings):
    before = _snapshot(client, integration_settings)
    yield
    assert _snapshot(client, integration_settings) == before, "a refused request stored something"


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _upload(client, filename: str, content: bytes, **form):
    return client.post(
        "/v1/datasets", files={"file": (filename, content, "application/octet-stream")}, data=form
    )


def test_pickle_inside_npz(client, unchanged, tmp_path):
    marker = tmp_path / "pwned"
    objects = np.empty(2, dtype=object)
    objects[:] = [Payload(marker), 1]
    buffer = io.BytesIO()
    np.savez(buffer, X=np.zeros((2, 3), np.float32), y=objects, allow_pickle=True)
    assert_problem(_upload(client, "evil.npz", buffer.getvalue()), 415, "pickle-refused")
    assert not marker.exists()


def test_lying_npy_header(client, unchanged):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("X.npy", header.getvalue() + b"\0" * 64)
        zf.writestr("y.npy", _npy(np.zeros(2, np.int64)))
    response = _upload(client, "liar.npz", archive.getvalue())
    assert response.status_code in (413, 422)
    assert_problem(response, response.status_code)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_nan_features(client, unchanged):
    x = np.ones((4, 3), np.float32)
    x[2, 1] = np.nan
    assert_problem(_upload(client, "nan.npz", _npz(X=x, y=np.arange(4))), 422, "non-finite-values")


def test_shape_mismatch(client, unchanged):
    assert_problem(
        _upload(client, "bad.npz", _npz(X=np.ones((4, 3), np.float32), y=np.arange(5))), 422, "shape-mismatch"
    )


def test_oversize_upload(client, unchanged, integration_env, tmp_path_factory):
    """A second API process with a 64 KiB cap answers 413 while streaming (and by Content-Length)."""

    from tests.conftest import ServerProcess

    env = {**integration_env, "IA_MAX_UPLOAD_BYTES": str(64 * 1024), "IA_SWEEP_INTERVAL_SECONDS": "0"}
    server = ServerProcess(env, tmp_path_factory.mktemp("cap") / "api.log", "--no-worker").wait_ready()
    try:
        with server.client(api_key=client.headers["authorization"].removeprefix("Bearer ")) as capped:
            big = _npz(X=np.ones((20_000, 4), np.float32), y=np.zeros(20_000, np.int64))
            assert_problem(_upload(capped, "big.npz", big), 413, "too-large")

            def chunks():  # no Content-Length: the cap must hold on the streamed body
                # A well-formed start of a file part, so only the size (never the parser) can refuse it.
                yield b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n\r\n'
                for _ in range(64):
                    yield b"x" * 4096

            response = capped.post(
                "/v1/datasets",
                content=chunks(),
                headers={"content-type": "multipart/form-data; boundary=zzz"},
            )
            assert_problem(response, 413, "too-large")
    finally:
        server.stop()


def test_valid_upload_roundtrip(client):
    response = _upload(
        client, "ok.npz", _npz(X=np.ones((6, 64), np.float32), y=np.arange(6) % 3), name="tiny"
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["n_examples"] == 6 and body["feature_shape"] == [64] and body["num_classes"] == 3
    assert len(body["sha256"]) == 64 and len(body["upload_sha256"]) == 64
    assert response.headers["location"].endswith(body["id"])


def test_unknown_architecture(client, unchanged):
    spec = {"name": "m", "architecture": {"name": "transformer-xxl", "params": {}}}
    body = assert_problem(register_model(client, spec, weights={"w": torch.zeros(1)}), 422)
    assert body["errors"][0]["pointer"] == "/spec/architecture/name"


def _mlp_state() -> dict[str, torch.Tensor]:
    from app.estimators import get_architecture, init_model
    from app.services.validation import validate_params

    arch = get_architecture("mlp")
    return init_model(arch, validate_params(arch.Params, DIGITS_MLP["params"], ""), seed=0).state_dict()


def test_shape_mismatch_names_the_tensor(client, unchanged):
    state = _mlp_state()
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    spec = {"name": "m", "architecture": DIGITS_MLP}
    body = assert_problem(register_model(client, spec, weights=state), 422, "weights-mismatch")
    assert name in body["detail"]


def test_pickled_and_pt2_checkpoints_refused(client, unchanged, tmp_path):
    marker = tmp_path / "pwned"
    state = _mlp_state()
    spec = {"name": "m", "architecture": DIGITS_MLP, "checkpoints": [{"step": 1, "learning_rate": 0.1}]}
    # torch.save pickle as a checkpoint
    buffer = io.BytesIO()
    torch.save({"state": state, "evil": Payload(marker)}, buffer)
    files = [
        ("weights", ("w.safetensors", save_tensors(state))),
        ("checkpoints", ("c.pt", buffer.getvalue())),
    ]
    response = client.post("/v1/models", data={"spec": json.dumps(spec)}, files=files)
    assert_problem(response, 415, "pickle-refused")
    # a torch.export archive renamed .safetensors
    module = torch.nn.Linear(2, 2)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(1, 2),)), str(pt2))
    files = [
        ("weights", ("w.safetensors", save_tensors(state))),
        ("checkpoints", ("c.safetensors", pt2.read_bytes())),
    ]
    response = client.post("/v1/models", data={"spec": json.dumps(spec)}, files=files)
    assert_problem(response, 415, "executable-archive-refused")
    # a raw pickle as weights
    files = [("weights", ("w.safetensors", pickle.dumps(Payload(marker))))]
    assert_problem(
        client.post(
            "/v1/models", data={"spec": json.dumps({"name": "m", "architecture": DIGITS_MLP})}, files=files
        ),
        415,
        "pickle-refused",
    )
    assert not marker.exists()


def test_model_without_weights_or_dataset(client, unchanged):
    body = assert_problem(register_model(client, {"name": "m", "architecture": DIGITS_MLP}), 422)
    assert body["errors"][0]["pointer"] == "/weights"


def test_model_dataset_feature_mismatch(client):
    cancer = builtin(client, "sklearn:breast_cancer")
    spec = {"name": "m", "architecture": DIGITS_MLP, "train_dataset_id": cancer["id"]}
    body = assert_problem(register_model(client, spec), 422)
    assert body["errors"][0]["pointer"] == "/spec/train_dataset_id"


def test_unknown_routes_and_methods_are_problems(client):
    assert_problem(client.get("/v1/nope"), 404)
    assert_problem(client.delete("/v1/datasets"), 405)
    body = assert_problem(client.post("/v1/datasets/builtin", json={"builtin": "sklearn:iris"}), 422)
    assert body["errors"][0]["pointer"] == "/builtin"


def test_a_million_by_a_million_score_matrix_is_refused_at_submit(client):
    """RELIABILITY.md: a 10^6 x 10^6 request is 4 TB of scores; with the default limits it gets 422 before
    anything is queued, although its n_train x n_query x p cost (4e12 for a 4-parameter model) is within
    IA_MAX_JOB_COST. Listing fewer queries brings it under the cap."""
    rows = 1_000_000
    data = _npz(X=np.zeros((rows, 1), np.float32), y=(np.arange(rows) % 2).astype(np.int32))
    response = _upload(client, "million.npz", data, name="million")
    assert response.status_code == 201, response.text
    dataset = response.json()
    model = init_model("linear", {"in_features": 1, "num_classes": 2})
    spec = {"name": "one-feature", "architecture": {"name": "linear", "params": {"in_features": 1}}}
    response = register_model(client, spec, weights=model.state_dict())
    assert response.status_code == 201, response.text
    body = {
        "model_id": response.json()["id"],
        "train_dataset_id": dataset["id"],
        "query_dataset_id": dataset["id"],
        "method": {"name": "grad_dot"},
    }
    jobs_before = client.get("/v1/influence-jobs", params={"page_size": 500}).json()["items"]
    problem = assert_problem(submit(client, body), 422, "job-too-large")
    assert "1e+12 scores exceed the limit 2e+08" in problem["detail"], problem
    assert [e["pointer"] for e in problem["errors"]] == ["/query_indices"]
    assert client.get("/v1/influence-jobs", params={"page_size": 500}).json()["items"] == jobs_before
    queued = submit(client, {**body, "query_indices": list(range(100))})
    assert queued.status_code == 202, queued.text
    assert client.post(queued.headers["location"] + "/cancel").json()["state"] == "cancelled"


def test_a_checkpoint_listed_twice_is_refused(client):
    """TracInCP sums over the listed checkpoints: one listed twice would count twice."""
    train = builtin(client, "sklearn:digits", "train")
    states = [init_model("mlp", DIGITS_MLP["params"], seed=s).state_dict() for s in range(3)]
    spec = {
        "name": "twice",
        "architecture": DIGITS_MLP,
        "checkpoints": [{"step": s, "learning_rate": 0.1} for s in (1, 2)],
    }
    model = register_model(client, spec, weights=states[0], checkpoints=states[1:])
    assert model.status_code == 201, model.text
    first = client.get(f"/v1/models/{model.json()['id']}/checkpoints").json()["items"][0]["id"]
    body = {
        "model_id": model.json()["id"],
        "train_dataset_id": train["id"],
        "query_indices": [0],
        "method": {"name": "tracincp"},
        "checkpoint_ids": [first, first],
    }
    problem = assert_problem(submit(client, body), 422)
    assert [e["pointer"] for e in problem["errors"]] == ["/checkpoint_ids"] and first in problem["detail"]


def test_oversized_or_deep_architectures_are_refused_before_anything_is_built(client, unchanged):
    """Counted on the meta device: 3.6e9 parameters are a 422 at once (building them took 13 GiB in
    the API process first), and more than 64 hidden layers are refused by validation."""
    wide = {"name": "mlp", "params": {"in_features": 64, "hidden": [60000, 60000], "num_classes": 10}}
    body = assert_problem(register_model(client, {"name": "wide", "architecture": wide}, weights={}), 422)
    assert "exceed the limit" in body["detail"]
    deep = {"name": "mlp", "params": {"in_features": 64, "hidden": [1] * 65, "num_classes": 10}}
    body = assert_problem(register_model(client, {"name": "deep", "architecture": deep}, weights={}), 422)
    assert "/spec/architecture/params/hidden" in [e["pointer"] for e in body["errors"]]


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (lambda t: t.to(torch.int64), "weights-mismatch", "dtype int64"),  # every forward pass failed
        (lambda t: t.double().fill_(1e300), "non-finite-values", "beyond float32"),  # inf in float32
    ],
)
def test_weights_of_the_wrong_kind_or_beyond_float32_are_refused(client, unchanged, change, code, words):
    state = _mlp_state()
    name = next(k for k in state if k.endswith("weight"))
    state[name] = change(state[name])
    spec = {"name": "m", "architecture": DIGITS_MLP}
    body = assert_problem(register_model(client, spec, weights=state), 422, code)
    assert name in body["detail"] and words in body["detail"]


def test_checkpoints_cannot_be_added_while_the_service_trains_the_model(client, integration_settings):
    """And its storage reservation counts the checkpoints training can save, at most one per epoch
    (num_checkpoints=1000 over one epoch reserved 1,001 copies of the weights for good)."""
    train = builtin(client, "sklearn:digits", "train")
    recipe = {"epochs": 1, "num_checkpoints": 1000}
    spec = {"name": "training", "architecture": DIGITS_MLP, "recipe": recipe, "train_dataset_id": train["id"]}
    model = register_model(client, spec)  # no worker in this module: it stays training
    assert model.status_code == 201 and model.json()["state"] == "training", model.text
    from app.db.models import Model
    from app.db.session import session_scope

    state_bytes = sum(t.numel() * t.element_size() for t in _mlp_state().values())
    with session_scope(integration_settings) as session:
        reserved = session.get(Model, model.json()["id"]).size_bytes
    assert reserved == 2 * state_bytes  # the weights and one checkpoint
    files = {"file": ("c.safetensors", save_tensors(_mlp_state()), "application/octet-stream")}
    added = client.post(f"/v1/models/{model.json()['id']}/checkpoints", files=files, data={"step": "1"})
    assert_problem(added, 409, "conflict")
