"""Load test of the real stack: status polling and job submission at constant arrival rates
while a job computes on the same machine.

Starts, on this machine's PostgreSQL (a fresh database) and Redis (its own DB numbers):
``influence serve --no-worker`` and one Celery worker that trains a conv net through the API
(so a core is busy computing during the whole run), then drives ``bench/openloop.py`` at
constant arrival rates: ``--poll-rps`` polls of that job's status and ``--submit-rps``
submissions of small jobs, latency measured from each request's scheduled instant (no
coordinated omission). The first ``--warmup`` seconds of the same load are reported apart, not
in the figures (as wrk2's calibration): they open the connections and grow the pools that a
steady load runs on. Locust's users showed a ~50 ms floor even on /healthz on this box, so the
generator is our own, small one. Afterwards it checks that every accepted job (202) is in
PostgreSQL and on the queue (zero lost jobs), prints a table and writes bench/out/load.json.

Usage: python bench/load.py [--poll-rps 300] [--submit-rps 50] [--duration 30] [--warmup 5]
                          [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
import torch
from safetensors.torch import save as save_tensors
from sqlalchemy import create_engine, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade  # noqa: E402
from app.db.models import Job  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.openloop import Request, Stream, run  # noqa: E402
from tests.conftest import ServerProcess, WorkerProcess, mint_key  # noqa: E402

PG_ADMIN_URL = os.environ.get("IA_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("IA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
BUSY_NET = {
    "name": "cnn",
    "params": {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10, "channels": [64, 128]},
}
LINEAR = {"name": "linear", "params": {"in_features": 64, "num_classes": 10}}
POLL, SUBMIT = "GET /v1/training-jobs/{id}", "POST /v1/influence-jobs"
UNLIMITED = {
    "max_active_jobs": 10**6,
    "max_running_jobs": 1,
    "read_requests_per_second": 10**6,
    "write_requests_per_second": 10**6,
}


def _database() -> str:
    name = f"ia_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    return url


def _drop(url: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def _setup(client: httpx.Client) -> tuple[str, dict]:
    """A conv net training through the API (the busy job to poll) and the body of a small job to submit."""
    train = client.post("/v1/datasets/builtin", json={"builtin": "sklearn:digits", "split": "train"})
    train = train.raise_for_status().json()
    busy = {
        "name": "busy",
        "architecture": BUSY_NET,
        "recipe": {"epochs": 500, "batch_size": 32, "learning_rate": 0.05, "num_checkpoints": 2},
        "train_dataset_id": train["id"],
    }
    busy = client.post("/v1/models", data={"spec": json.dumps(busy)}).raise_for_status().json()
    weights = {"1.weight": torch.zeros(10, 64), "1.bias": torch.zeros(10)}
    small = (
        client.post(
            "/v1/models",
            data={"spec": json.dumps({"name": "small", "architecture": LINEAR})},
            files={"weights": ("w.safetensors", save_tensors(weights))},
        )
        .raise_for_status()
        .json()
    )
    body = {
        "model_id": small["id"],
        "train_dataset_id": train["id"],
        "query_indices": [0],
        "method": {"name": "grad_dot"},
    }
    return busy["training_job_id"], body


def _wait_running(client: httpx.Client, path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get(path).json()["state"] != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never started")
        time.sleep(0.2)


def _drive(
    url: str, api_key: str, busy_job: str, body: dict, args
) -> tuple[list[dict], list[dict], list[str]]:
    """(warm-up summaries, measured summaries, ids of every accepted job of both phases)."""
    accepted: list[str] = []

    def keep(status: int, response: bytes) -> None:
        if status == 202:
            accepted.append(json.loads(response)["id"])

    def streams() -> list[Stream]:
        both = [
            Stream(POLL, args.poll_rps, Request("GET", f"/v1/training-jobs/{busy_job}")),
            Stream(SUBMIT, args.submit_rps, Request("POST", "/v1/influence-jobs", body), keep),
        ]
        return [s for s in both if s.rate > 0]

    headers = {"Authorization": f"Bearer {api_key}"}
    # Connections, pools and threads grow to the load's size first; reported apart, not in the figures.
    warmup = run(url, headers, streams(), args.warmup) if args.warmup > 0 else []
    return warmup, run(url, headers, streams(), args.duration), accepted


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--poll-rps", type=int, default=300)
    parser.add_argument("--submit-rps", type=int, default=50)
    parser.add_argument("--duration", type=int, default=30, help="Seconds of load.")
    parser.add_argument(
        "--warmup",
        type=float,
        default=5,
        help="Seconds of the same load first, reported apart (as wrk2's calibration).",
    )
    parser.add_argument("--processes", type=int, default=2, help="API processes (uvicorn workers).")
    parser.add_argument("--idle", action="store_true", help="No worker: nothing computes during the load.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "load.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ia-load-"))
    db_url = _database()
    broker, counters = f"{REDIS_URL}/9", f"{REDIS_URL}/10"
    for url in (broker, counters):
        redis.Redis.from_url(url).flushdb()
    queue = f"load-{uuid.uuid4().hex[:6]}"
    env = {
        "IA_DATABASE_URL": db_url,
        "IA_BROKER_URL": broker,
        "IA_RATE_LIMIT_STORAGE_URL": counters,
        "IA_DATA_DIR": str(tmp),
        "IA_API_KEY_PEPPER": uuid.uuid4().hex,
        "IA_COMPUTE_QUEUE": queue,
        "IA_TORCH_THREADS": "1",
        "IA_LOG_LEVEL": "WARNING",  # no per-request access log lines
    }
    settings = Settings(**{k[3:].lower(): v for k, v in env.items()})
    server = ServerProcess(env, tmp / "api.log", "--no-worker", "--processes", str(args.processes))
    worker = None
    try:
        server.wait_ready()
        server.api_key = mint_key(settings, "load")
        from app.db.session import session_scope
        from app.services import tenants

        with session_scope(settings) as session:
            tenants.by_name(session, "load").limits = UNLIMITED
        worker = None if args.idle else WorkerProcess(env, tmp / "worker.log").start()
        with server.client() as client:
            busy_job, body = _setup(client)
            if worker is not None:
                _wait_running(client, f"/v1/training-jobs/{busy_job}")
            single = []
            for _ in range(50):
                started = time.perf_counter()
                client.get(f"/v1/training-jobs/{busy_job}").raise_for_status()
                single.append(1000 * (time.perf_counter() - started))
        warmup, endpoints, accepted = _drive(server.url, server.api_key, busy_job, body, args)
        with server.client() as client:
            busy_state = client.get(f"/v1/training-jobs/{busy_job}").json()["state"]
        engine = create_engine(db_url)
        with engine.connect() as conn:
            rows = dict(conn.execute(select(Job.id, Job.state).where(Job.id.in_(accepted))).all())
        engine.dispose()
        queued_messages = redis.Redis.from_url(broker).llen(queue)
        lost = [job_id for job_id in accepted if job_id not in rows]
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "api_processes": args.processes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "single_request_ms_median": sorted(single)[len(single) // 2],
            "busy_job_state_after": busy_state,
            "accepted_jobs": len(accepted),
            "lost_jobs": len(lost),
            "jobs_queued_in_db": sum(1 for s in rows.values() if s == "queued"),
            "messages_on_queue": queued_messages,
            "endpoints": endpoints,
            "warmup_endpoints": warmup,
        }
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        _drop(db_url)
    print(
        f"\nload test: {args.duration}s after {args.warmup:g}s of warm-up, {args.processes} API processes, "
        f"a conv net training meanwhile (state after: {report['busy_job_state_after']}); "
        f"single poll {report['single_request_ms_median']:.1f} ms"
    )
    print(
        f"{'endpoint':30} {'target/s':>8} {'got/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}  statuses"
    )
    for e in report["endpoints"] + [{**w, "name": f"(warm-up) {w['name']}"} for w in warmup]:
        print(
            f"{e['name']:30} {e['target_rps']:>8} {e['achieved_rps']:>7} {e['p50_ms']:>7.0f} "
            f"{e['p95_ms']:>7.0f} {e['p99_ms']:>7.0f} {e['max_ms']:>7.0f}  "
            f"{e['statuses']} errors {e['errors']}"
        )
    print(
        f"accepted jobs {report['accepted_jobs']}, lost {report['lost_jobs']}, "
        f"queued in PostgreSQL {report['jobs_queued_in_db']}, "
        f"messages on the queue {report['messages_on_queue']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
