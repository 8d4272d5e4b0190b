"""Service overhead: a TracInCP job through the API vs the same computation in-process.

Starts ``influence serve`` (embedded profile, and the production profile on the
local PostgreSQL + Redis when reachable), trains a digits MLP through the API,
then times, side by side:

* ``api``: submit -> poll (every 20 ms) -> succeeded, wall clock at the client;
* ``worker``: the estimator's own compute time as recorded by the worker;
* ``in-process``: the same estimator call on the same stored artifacts here.

``--gap`` pauses between jobs, as an idle worker sees them (0: each job right after the last).

Usage: python bench/service_overhead.py [--repeats 5] [--queries 64] [--profiles embedded,postgres] [--gap 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.estimators import (  # noqa: E402  # noqa: E402
    REGISTRY,
    Checkpoint,
    InfluenceProblem,
    Runtime,
    TaskSpec,
    get_architecture,
    init_model,
)
from app.services.validation import validate_params  # noqa: E402
from app.storage.artifacts import ArtifactStore  # noqa: E402

MLP = {"name": "mlp", "params": {"in_features": 64, "hidden": [64], "num_classes": 10}}
RECIPE = {
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "momentum": 0.9,
    "epochs": 10,
    "batch_size": 64,
    "weight_decay": 1e-3,
    "seed": 0,
    "num_checkpoints": 5,
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(client: httpx.Client, path: str, poll: float = 0.02) -> dict:
    while True:
        body = client.get(path).json()
        if body["state"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(poll)


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--worker", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(log.read_text()[-2000:])


def _postgres_env(tmp: Path) -> dict[str, str] | None:
    from sqlalchemy import create_engine, text

    admin_url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    name = f"ia_bench_{uuid.uuid4().hex[:8]}"
    try:
        engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        import redis

        redis.Redis.from_url("redis://127.0.0.1:6379/15").flushdb()
    except Exception as exc:  # noqa: BLE001
        print(f"postgres profile skipped: {exc}")
        return None
    return {
        "IA_DATABASE_URL": admin_url.rsplit("/", 1)[0] + f"/{name}",
        "IA_BROKER_URL": "redis://127.0.0.1:6379/15",
        "IA_DATA_DIR": str(tmp / "pg"),
        "IA_COMPUTE_QUEUE": "bench",
        "IA_API_KEY_PEPPER": uuid.uuid4().hex,
    }


def _api_key(env: dict[str, str]) -> str:
    """The embedded profile's local admin key (written on first start), or one minted in PostgreSQL."""
    if not env.get("IA_DATABASE_URL"):
        return (Path(env["IA_DATA_DIR"]) / "admin-api-key").read_text().strip()
    from app.settings import Settings
    from tests.conftest import mint_key

    return mint_key(Settings(**{k[3:].lower(): v for k, v in env.items() if v}), "bench")


def _direct(
    store: ArtifactStore, client: httpx.Client, model: dict, train: dict, test: dict, queries: list[int]
):
    from safetensors.torch import load_file

    arch = get_architecture("mlp")
    module = init_model(arch, validate_params(arch.Params, model["architecture_params"], ""), seed=0)
    tr, te = store.load_npz(train["uri"]), store.load_npz(test["uri"])
    checkpoints = client.get(f"/v1/models/{model['id']}/checkpoints").json()["items"]
    problem = InfluenceProblem(
        model=module,
        task=TaskSpec(),
        weights=load_file(str(store.path(model["weights_uri"]))),
        train_x=torch.as_tensor(tr["X"]),
        train_y=torch.as_tensor(tr["y"]),
        query_x=torch.as_tensor(te["X"][queries]),
        query_y=torch.as_tensor(te["y"][queries]),
        checkpoints=[
            Checkpoint(c["step"], c["learning_rate"], load_file(str(store.path(c["uri"]))))
            for c in checkpoints
        ],
    )
    started = time.perf_counter()
    REGISTRY["tracincp"].attribute(problem, REGISTRY["tracincp"].Params(), runtime=Runtime(chunk_size=256))
    return time.perf_counter() - started


def run_profile(
    name: str, env: dict[str, str], tmp: Path, repeats: int, n_queries: int, gap: float = 0.0
) -> dict:
    env = {**env, "IA_TORCH_THREADS": "1", "IA_HEARTBEAT_SECONDS": "1"}
    proc, url = _serve(env, tmp / f"{name}.log")
    try:
        headers = {"Authorization": f"Bearer {_api_key(env)}"}
        with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
            train = client.post(
                "/v1/datasets/builtin", json={"builtin": "sklearn:digits", "split": "train"}
            ).json()
            test = client.post(
                "/v1/datasets/builtin", json={"builtin": "sklearn:digits", "split": "test"}
            ).json()
            spec = {"name": "bench", "architecture": MLP, "recipe": RECIPE, "train_dataset_id": train["id"]}
            model = client.post("/v1/models", data={"spec": json.dumps(spec)}).json()
            _wait(client, f"/v1/training-jobs/{model['training_job_id']}")
            model = client.get(f"/v1/models/{model['id']}").json()
            queries = list(range(n_queries))
            body = {
                "model_id": model["id"],
                "train_dataset_id": train["id"],
                "query_dataset_id": test["id"],
                "query_indices": queries,
                "method": {"name": "tracincp"},
                "output": {"top_k": 10},
            }
            api, worker, queue_wait, run = [], [], [], []
            for _ in range(repeats):
                time.sleep(gap)
                started = time.perf_counter()
                job = client.post("/v1/influence-jobs", json=body).json()
                job = _wait(client, f"/v1/influence-jobs/{job['id']}")
                api.append(time.perf_counter() - started)
                assert job["state"] == "succeeded", job
                details = client.get(
                    f"/v1/influence-jobs/{job['id']}/results", params={"page_size": 1}
                ).json()
                worker.append(details["details"]["compute_seconds"])
                created, started, finished = (
                    datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")
                )
                queue_wait.append((started - created).total_seconds())
                run.append((finished - started).total_seconds())
            torch.set_num_threads(1)
            store = ArtifactStore(Path(env["IA_DATA_DIR"]).resolve() / "artifacts")
            direct = [_direct(store, client, model, train, test, queries) for _ in range(repeats)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    med = statistics.median
    return {
        "profile": name,
        "api_s": med(api),
        "worker_compute_s": med(worker),
        "in_process_s": med(direct),
        "queue_wait_s": med(queue_wait),
        "run_s": med(run),
        "overhead_s": med(api) - med(direct),
        "ratio": med(api) / med(direct),
        "n_train": train["n_examples"],
        "n_queries": n_queries,
        "checkpoints": RECIPE["num_checkpoints"],
        "n_parameters": model["n_parameters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--profiles", default="embedded,postgres")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between jobs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for profile in args.profiles.split(","):
            if profile == "embedded":
                env = {"IA_DATA_DIR": str(tmp / "embedded"), "IA_DATABASE_URL": "", "IA_BROKER_URL": ""}
            else:
                env = _postgres_env(tmp)
                if env is None:
                    continue
            rows.append(run_profile(profile, env, tmp, args.repeats, args.queries, args.gap))
    print(
        f"\nTracInCP job, digits MLP; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 1 compute thread, median of {args.repeats}, {args.gap:g} s between jobs"
    )
    print(
        f"{'profile':<10} {'n_train':>7} {'queries':>7} {'ckpts':>5} {'api s':>8} {'worker s':>9} "
        f"{'in-proc s':>9} {'overhead s':>10} {'api/in-proc':>11} {'queue wait s':>12} {'claim->done s':>13}"
    )
    for r in rows:
        print(
            f"{r['profile']:<10} {r['n_train']:>7} {r['n_queries']:>7} {r['checkpoints']:>5} "
            f"{r['api_s']:>8.3f} {r['worker_compute_s']:>9.3f} {r['in_process_s']:>9.3f} "
            f"{r['overhead_s']:>10.3f} {r['ratio']:>11.2f} {r['queue_wait_s']:>12.3f} {r['run_s']:>13.3f}"
        )


if __name__ == "__main__":
    main()
