"""The compute sandbox on the real worker: no credentials in the child, cancel kills it, limits fail jobs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from app.estimators import get_architecture, init_model
from app.services.validation import validate_params
from tests.conftest import WorkerProcess
from tests.integration.flows import builtin, register_model, submit, wait

pytestmark = pytest.mark.integration

CNN = {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10, "channels": [64, 128]}


@pytest.fixture(scope="module")
def models(api_server) -> dict:
    """A conv-net TracInCP job of several seconds (12 checkpoints: heartbeats publish its train-gradient
    phase several times even on a loaded machine), and a linear model whose logits overflow to inf."""
    with api_server.client() as client:
        train = builtin(client, "sklearn:digits", "train")
        arch = get_architecture("cnn")
        params = validate_params(arch.Params, CNN, "")
        states = [init_model(arch, params, seed=s).state_dict() for s in range(13)]
        spec = {
            "name": "slow",
            "architecture": {"name": "cnn", "params": CNN},
            "checkpoints": [{"step": 10 * i, "learning_rate": 0.1} for i in range(12)],
        }
        slow = register_model(client, spec, weights=states[0], checkpoints=states[1:])
        assert slow.status_code == 201, slow.text
        linear = {"name": "linear", "params": {"in_features": 64, "num_classes": 10}}
        huge = {
            k: torch.full_like(v, 3e38)
            for k, v in init_model("linear", linear["params"], seed=0).state_dict().items()
        }
        overflow = register_model(client, {"name": "overflow", "architecture": linear}, weights=huge)
        assert overflow.status_code == 201, overflow.text
    return {
        "slow": {
            "model_id": slow.json()["id"],
            "train_dataset_id": train["id"],
            "query_indices": list(range(40)),
            "method": {"name": "tracincp"},
        },
        "overflow": {
            "model_id": overflow.json()["id"],
            "train_dataset_id": train["id"],
            "query_indices": [0, 1],
            "method": {"name": "grad_dot"},
        },
    }


def _compute_children(worker: WorkerProcess) -> dict[str, list[int]]:
    """Processes running ``worker.sandbox`` under the worker's pool processes: "busy" ones hold an
    assignment (their scratch folder, the cwd, has assignment.json), "warm" ones wait for the next task."""
    found: dict[str, list[int]] = {"busy": [], "warm": []}
    for pool in worker.children():
        listed = subprocess.run(["pgrep", "-P", str(pool)], capture_output=True, text=True).stdout
        for pid in map(int, listed.split()):
            try:
                if b"worker.sandbox" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    busy = Path(f"/proc/{pid}/cwd/assignment.json").exists()
                    found["busy" if busy else "warm"].append(pid)
            except OSError:
                pass
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _wait_computing(client, location: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json()
        if job["state"] == "running" and job["progress"]["phase"] == "train_gradients":
            return
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job never started computing: {job}")


def test_child_has_no_credentials_and_cancel_kills_it(client, worker_factory, models):
    worker = worker_factory()
    location = submit(client, models["slow"]).headers["location"]
    _wait_computing(client, location)
    children = _compute_children(worker)
    assert len(children["busy"]) == 1 and len(children["warm"]) == 1, children  # the next task's child
    child = children["busy"][0]
    assert "IA_DATABASE_URL" in _environ(worker.proc.pid)
    for pid in (child, *children["warm"]):
        env = _environ(pid)
        assert not [k for k in env if k.startswith("IA_")], env
        assert not [v for v in env.values() if "postgresql" in v or "redis://" in v], env

    assert client.post(location + "/cancel").status_code == 202
    assert wait(client, location, timeout=30)["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the compute child outlived the cancelled job"


def test_next_job_runs_in_the_child_started_during_the_previous_one(client, worker_factory, models):
    """Pool processes are reused, and each task starts the next one's child: back-to-back jobs do not
    wait for an interpreter to import torch."""
    worker = worker_factory()
    first = submit(client, models["slow"]).headers["location"]
    _wait_computing(client, first)
    pools, warm = worker.children(), _compute_children(worker)["warm"]
    assert len(pools) == 1 and len(warm) == 1, (pools, warm)
    assert wait(client, first, timeout=120)["state"] == "succeeded"
    second = submit(client, models["slow"]).headers["location"]
    _wait_computing(client, second)
    assert worker.children() == pools, "the pool process was replaced"
    assert _compute_children(worker)["busy"] == warm, "the second job did not take the prestarted child"
    assert wait(client, second, timeout=120)["state"] == "succeeded"


def test_wall_clock_limit_fails_the_job_with_timeout(client, integration_env, tmp_path, models):
    worker = WorkerProcess({**integration_env, "IA_SANDBOX_WALL_SECONDS": "2"}, tmp_path / "w.log").start()
    try:
        job = wait(client, submit(client, models["slow"]).headers["location"], timeout=120)
    finally:
        worker.stop()
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "timeout" and "IA_SANDBOX_WALL_SECONDS" in job["error"]["detail"]
    assert client.get(f"/v1/influence-jobs/{job['id']}/results").status_code == 409


def test_estimator_error_in_the_child_is_the_same_problem(client, worker_factory, models):
    worker_factory()
    job = wait(client, submit(client, models["overflow"]).headers["location"], timeout=120)
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "numerical-instability" and job["error"]["status"] == 422, job["error"]
    assert client.get(f"/v1/influence-jobs/{job['id']}/results").status_code == 409
