"""Fault injection on real processes: private PostgreSQL and Redis crashed and restarted, Redis hung,
PostgreSQL's connections terminated, a worker's pool child killed, a worker paused past its lease, a
full artifact disk, a model that emits NaN.

After each fault the invariant checker (``ChaosStack.check_invariants``) asserts that every
accepted job ended, that no job has two results or lost its result, that no running job holds an
expired lease and that no message or staging file is left behind. The SIGKILL of a whole worker
(main process and child) is covered by ``test_faults.py``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import InfluenceResult, Job, Model
from app.estimators import get_architecture, init_model
from app.services import jobs as jobs_service
from app.services.validation import validate_params
from tests.integration.flows import DIGITS_MLP, assert_problem, builtin, register_model, submit, wait
from tests.integration.private_stack import ChaosStack, running, signal_worker
from tests.integration.test_faults import SLOW_NET

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="runs PostgreSQL as the postgres user and mounts a tmpfs: needs root"
    ),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[ChaosStack]:
    with running(tmp_path_factory.mktemp("chaos")) as chaos:
        yield chaos


@pytest.fixture(autouse=True)
def healthy(stack: ChaosStack) -> None:
    """Each scenario starts with every service up, even after an earlier one failed half-way."""
    stack.heal()


@dataclass(frozen=True)
class Jobs:
    """Request bodies: a slow job (about ten seconds of per-example gradients) and quick ones."""

    slow: dict
    quick: dict
    nan: dict


def _states(name: str, seeds: Iterable[int], scale: float = 1.0) -> list[dict]:
    arch = get_architecture(name)
    params = validate_params(arch.Params, (SLOW_NET if name == "cnn" else DIGITS_MLP)["params"], "")
    states = [init_model(arch, params, seed=s).state_dict() for s in seeds]
    return [{k: v * scale if k.endswith("weight") else v for k, v in s.items()} for s in states]


def _model(client: httpx.Client, spec: dict, states: list[dict]) -> str:
    response = register_model(client, spec, weights=states[0], checkpoints=states[1:])
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def jobs(stack: ChaosStack) -> Jobs:
    with stack.client() as client:
        train = builtin(client, "sklearn:digits", "train")["id"]
        cnn = {"name": "slow", "architecture": SLOW_NET}
        # twelve checkpoints: several seconds of per-example gradients even on a fast core, so a scenario
        # can act while the job computes
        cnn["checkpoints"] = [{"step": 10 * i, "learning_rate": 0.1} for i in range(12)]
        slow = _model(client, cnn, _states("cnn", range(13)))
        quick = _model(client, {"name": "quick", "architecture": DIGITS_MLP}, _states("mlp", range(1)))
        # Finite weights pass upload validation; 1e30 overflows float32 logits to inf, so the loss is NaN.
        nan = _model(client, {"name": "nan", "architecture": DIGITS_MLP}, _states("mlp", range(1), 1e30))
    base = {"train_dataset_id": train, "output": {"top_k": 5}}
    return Jobs(
        slow={**base, "model_id": slow, "query_indices": list(range(20)), "method": {"name": "tracincp"}},
        quick={**base, "model_id": quick, "query_indices": [0, 1], "method": {"name": "grad_dot"}},
        nan={**base, "model_id": nan, "query_indices": [0, 1], "method": {"name": "grad_dot"}},
    )


def accepted(client: httpx.Client, body: dict) -> str:
    response = submit(client, body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_computing(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    """Until the job's current attempt reports per-example gradient progress."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/influence-jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"].get("phase") == "train_gradients":
            return job
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"job never started computing: {job}"
        time.sleep(0.1)


def outcomes(checked: dict[str, dict]) -> dict[str, tuple]:
    """(state, attempt, error code) per job: short enough to survive pytest's truncation."""
    return {i[:8]: (j["state"], j["attempt"], (j["error"] or {}).get("code")) for i, j in checked.items()}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_disk_full_refuses_uploads_fails_the_job_then_recovers(stack: ChaosStack, jobs: Jobs):
    keep = {**jobs.quick, "output": {"top_k": 5, "keep_full_matrix": True}}
    with stack.client() as client, stack.engine.connect() as conn:
        files = stack.artifact_files()
        models = conn.scalar(select(func.count()).select_from(Model))
        stack.fill_disk()
        try:
            upload = register_model(client, {"name": "x", "architecture": DIGITS_MLP}, _states("mlp", [7])[0])
            assert_problem(upload, 507, "disk-full")
            dataset = client.post("/v1/datasets/builtin", json={"builtin": "sklearn:digits", "split": "test"})
            assert_problem(dataset, 507, "disk-full")
            failed = accepted(client, keep)
            job = wait(client, f"/v1/influence-jobs/{failed}", timeout=120)
            assert (job["state"], (job["error"] or {}).get("code")) == ("failed", "disk-full"), job["error"]
            assert stack.artifact_files() == files, "a refused write left an artifact behind"
            assert conn.scalar(select(func.count()).select_from(Model)) == models
        finally:
            stack.filler.unlink()

        upload = register_model(client, {"name": "x", "architecture": DIGITS_MLP}, _states("mlp", [7])[0])
        assert upload.status_code == 201, upload.text
        retried = accepted(client, keep)
        checked = stack.check_invariants([failed, retried])
    assert checked[retried]["state"] == "succeeded", outcomes(checked)


def test_model_emitting_nan_fails_with_numerical_instability(stack: ChaosStack, jobs: Jobs):
    with stack.client() as client:
        job_id = accepted(client, jobs.nan)
    job = stack.check_invariants([job_id])[job_id]
    assert job["state"] == "failed", outcomes({job_id: job})
    assert (job["error"] or {}).get("code") == "numerical-instability", job["error"]


def test_sigkill_pool_child_mid_job_reruns_once(stack: ChaosStack, jobs: Jobs):
    with stack.client() as client:
        job_id = accepted(client, jobs.slow)
        wait_computing(client, job_id)
        worker, child = stack.worker_of(job_id)
        os.kill(child, signal.SIGKILL)
        job = stack.check_invariants([job_id])[job_id]
    assert job["state"] == "succeeded" and job["attempt"] == 2, outcomes({job_id: job})
    assert worker.proc.poll() is None, "the main process survives and forks a new child"


def test_worker_paused_past_its_lease_cannot_commit_late(stack: ChaosStack, jobs: Jobs):
    if len(stack.live_workers()) < 2:
        stack.worker()  # takes over while the first one is frozen
    with stack.client() as client:
        job_id = accepted(client, jobs.slow)
        wait_computing(client, job_id)
        stale, _ = stack.worker_of(job_id)
        dropped_before = stale.log_path.read_bytes().count(b"'lease-lost'")
        signal_worker(stale, signal.SIGSTOP)
        try:
            done = wait(client, f"/v1/influence-jobs/{job_id}", timeout=180)
            assert done["state"] == "succeeded" and done["attempt"] == 2, outcomes({job_id: done})
            before = _job_and_result(stack, job_id)
        finally:
            signal_worker(stale, signal.SIGCONT)
        # The stale delivery is over once its task has returned 'lease-lost' (Celery logs the result).
        wait_until(
            lambda: stale.log_path.read_bytes().count(b"'lease-lost'") > dropped_before,
            60,
            "the resumed worker to drop its delivery",
        )
        assert _job_and_result(stack, job_id) == before, "the stale attempt changed the job"
        # Had the stale delivery reached its final commit, the fencing token refuses it.
        stale_claim = jobs_service.Claim(job_id, "influence", 1)
        assert not jobs_service.finish(stack.settings, stale_claim, "failed", error={"code": "stale"})
        assert _job_and_result(stack, job_id) == before
        stack.check_invariants([job_id])


def _job_and_result(stack: ChaosStack, job_id: str) -> tuple:
    with stack.engine.connect() as conn:
        job = conn.execute(
            select(Job.state, Job.attempt, Job.finished_at, Job.error, Job.worker_id).where(Job.id == job_id)
        ).one()
        results = conn.execute(
            select(InfluenceResult.attempt, InfluenceResult.created_at).where(
                InfluenceResult.job_id == job_id
            )
        ).all()
    return tuple(job), tuple(map(tuple, results))


def test_redis_crash_and_restart_mid_run(stack: ChaosStack, jobs: Jobs):
    with stack.client() as client:
        running_id = accepted(client, jobs.slow)
        wait_computing(client, running_id)
        queued = accepted(client, jobs.quick)
        # appendfsync everysec: what was published is on disk within about a second (longer under load)
        wait_until(lambda: stack.redis.on_disk(queued), 30, "the queued message in the AOF")
        stack.redis.kill9()
        try:
            assert_problem(client.get("/readyz"), 503, "not-ready")
            started = time.monotonic()
            during = accepted(client, jobs.quick)  # the row is committed; the sweeper publishes it later
            assert time.monotonic() - started < 15, "a publish to a dead broker must time out, not hang"
            assert client.get(f"/v1/influence-jobs/{running_id}").status_code == 200
        finally:
            stack.redis.start()
        waiting, unacked = stack.redis.messages()
        survived = {i for ids in waiting.values() for i in ids} | set(unacked)
        if queued not in survived:
            # It was on disk, so a worker took it between the AOF write and the kill: kombu pops a
            # message and records it as unacked in two steps, and the crash fell between them. The
            # database still has the job queued, and the outbox sweeper must publish it again: the
            # invariant check below requires it to succeed.
            print(
                f"queued message {queued} was in flight to a worker at the crash; the sweeper re-publishes it"
            )
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "readiness after the restart")
        checked = stack.check_invariants([running_id, queued, during])
    assert all(j["state"] == "succeeded" for j in checked.values()), outcomes(checked)


def test_postgres_immediate_stop_and_restart_mid_run(stack: ChaosStack, jobs: Jobs):
    with stack.client() as client:
        running_id = accepted(client, jobs.slow)
        wait_computing(client, running_id)
        queued = accepted(client, jobs.quick)
        finishing = _held_job(stack, queued)
        probes = [
            ("GET", "/readyz", None),
            ("GET", f"/v1/influence-jobs/{running_id}", None),
            ("GET", "/v1/influence-jobs", None),
            ("POST", "/v1/influence-jobs", jobs.quick),
        ]
        stack.pg.stop_immediate()
        with ThreadPoolExecutor(1) as pool:
            # A worker's final commit issued while the database is down lands once it is back.
            late = pool.submit(
                jobs_service.finish, stack.settings, finishing, "failed", error={"code": "test-outcome"}
            )
            try:
                answered = 0
                until = time.monotonic() + 4
                while time.monotonic() < until:
                    for method, path, body in probes:
                        response = client.request(method, path, json=body)
                        assert response.status_code != 500, f"{method} {path}: {response.text}"
                        assert_problem(response, 503)
                        answered += 1
            finally:
                stack.pg.start()
            assert late.result(timeout=60) is True, "the retried final commit was refused"
        assert answered >= len(probes)
        wait_until(
            lambda: client.get(f"/v1/influence-jobs/{running_id}").status_code == 200,
            30,
            "the API to recover",
        )
        checked = stack.check_invariants([running_id, queued, finishing.job_id])
    assert checked[finishing.job_id]["error"] == {"code": "test-outcome"}, checked[finishing.job_id]
    assert checked[running_id]["state"] == checked[queued]["state"] == "succeeded", outcomes(checked)


def _held_job(stack: ChaosStack, like: str) -> jobs_service.Claim:
    """A job row claimed by "this process" with a lease long enough that no sweeper takes it back."""
    with Session(stack.engine) as session, session.begin():
        template = session.get(Job, like)
        job = Job(
            tenant_id=template.tenant_id,
            kind="influence",
            state="running",
            model_id=template.model_id,
            train_dataset_id=template.train_dataset_id,
            spec=template.spec,
            attempt=1,
            worker_id="chaos-test:0",
            lease_expires_at=utcnow() + timedelta(minutes=5),
            progress={},
        )
        session.add(job)
        session.flush()
        return jobs_service.Claim(job.id, "influence", 1)


def test_redis_hang_mid_run(stack: ChaosStack, jobs: Jobs):
    """Redis stops answering (SIGSTOP: connections open, no replies) for eight seconds mid-run: submits
    and polls still answer in bounded time, and every job ends once it answers again."""
    with stack.client() as client:
        running_id = accepted(client, jobs.slow)
        wait_computing(client, running_id)
        os.kill(stack.redis.proc.pid, signal.SIGSTOP)
        try:
            hung = time.monotonic()
            started = time.monotonic()
            during = accepted(client, jobs.quick)  # committed; published now or by the sweeper later
            assert time.monotonic() - started < 15, "a publish to a hung broker must time out, not hang"
            assert client.get(f"/v1/influence-jobs/{running_id}").status_code == 200
            time.sleep(max(0.0, 8 - (time.monotonic() - hung)))
        finally:
            os.kill(stack.redis.proc.pid, signal.SIGCONT)
        checked = stack.check_invariants([running_id, during])
    assert all(j["state"] == "succeeded" for j in checked.values()), outcomes(checked)


def test_postgres_connections_terminated_mid_run(stack: ChaosStack, jobs: Jobs):
    """Every client connection to PostgreSQL is killed (pg_terminate_backend) twice mid-run: the API
    answers 200 or 503 problem+json (never 500) and recovers, and the workers' heartbeats and commits
    reconnect."""
    kill = text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    with stack.client() as client:
        running_id = accepted(client, jobs.slow)
        wait_computing(client, running_id)
        queued = accepted(client, jobs.quick)
        for _ in range(2):
            with stack.engine.begin() as conn:
                assert conn.execute(kill).scalar() >= 1
            for path in (f"/v1/influence-jobs/{running_id}", "/v1/influence-jobs", "/readyz"):
                response = client.get(path)
                assert response.status_code in (200, 503), f"{path}: {response.status_code} {response.text}"
                if response.status_code == 503:
                    assert_problem(response, 503)
            time.sleep(1.0)
        recovered = lambda: client.get(f"/v1/influence-jobs/{running_id}").status_code == 200  # noqa: E731
        wait_until(recovered, 30, "the API to recover")
        checked = stack.check_invariants([running_id, queued])
    assert all(j["state"] == "succeeded" for j in checked.values()), outcomes(checked)
