"""Faults with real processes: a worker killed with SIGKILL mid-job, and cancellation mid-job."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, func, select

from app.db.models import InfluenceResult, QueryResult
from app.estimators import get_architecture, init_model
from app.services.validation import validate_params
from tests.integration.flows import builtin, register_model, submit, wait

pytestmark = pytest.mark.integration

# Twelve checkpoints of a 77k-parameter conv net over the digits training split: its train-gradient phase
# lasts ~6 s on one core, long enough for several 0.5 s heartbeats to publish its progress.
SLOW_NET = {
    "name": "cnn",
    "params": {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10, "channels": [64, 128]},
}


@pytest.fixture(scope="module")
def slow_job_body(api_server):
    """A TracInCP job that takes several seconds on one thread (a 77k-parameter conv net, 12 checkpoints)."""

    with api_server.client() as client:
        train = builtin(client, "sklearn:digits", "train")
        arch = get_architecture("cnn")
        params = validate_params(arch.Params, SLOW_NET["params"], "")
        states = [init_model(arch, params, seed=s).state_dict() for s in range(13)]
        spec = {
            "name": "slow",
            "architecture": SLOW_NET,
            "checkpoints": [{"step": 10 * i, "learning_rate": 0.1} for i in range(12)],
        }
        response = register_model(client, spec, weights=states[0], checkpoints=states[1:])
        assert response.status_code == 201, response.text
        model = response.json()
    return {
        "model_id": model["id"],
        "train_dataset_id": train["id"],
        "query_indices": list(range(40)),
        "method": {"name": "tracincp"},
        "output": {"top_k": 5},
    }


def _wait_running_with_progress(client, location: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json()
        if (
            job["state"] == "running"
            and job["progress"]["completed_units"] > 0
            and job["progress"]["phase"] == "train_gradients"
        ):
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job never showed progress: {job}")


def test_kill9_worker_mid_job_reruns_and_stores_once(
    client, worker_factory, slow_job_body, integration_settings
):
    first = worker_factory()
    location = submit(client, slow_job_body).headers["location"]
    running = _wait_running_with_progress(client, location)
    assert running["attempt"] == 1
    first.kill9()

    worker_factory()  # a fresh worker; the API's sweeper re-queues the job once its lease expires
    job = wait(client, location, timeout=240)
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2

    engine = create_engine(integration_settings.resolved_database_url)
    with engine.connect() as conn:
        results = conn.execute(
            select(InfluenceResult.attempt).where(InfluenceResult.job_id == job["id"])
        ).all()
        n_rows = conn.scalar(
            select(func.count()).select_from(QueryResult).where(QueryResult.job_id == job["id"])
        )
    engine.dispose()
    assert results == [(2,)], "exactly one result, written by the second attempt"
    assert n_rows == len(slow_job_body["query_indices"])


def test_cancel_mid_job_then_worker_is_free(client, worker_factory, slow_job_body):
    worker_factory()
    location = submit(client, slow_job_body).headers["location"]
    _wait_running_with_progress(client, location)
    asked = time.monotonic()
    response = client.post(location + "/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested_at"]
    job = wait(client, location, timeout=30)
    took = time.monotonic() - asked
    assert job["state"] == "cancelled", job
    assert took < 5, f"cancellation took {took:.1f}s"
    assert client.post(location + "/cancel").status_code == 202  # idempotent
    results = client.get(location + "/results")
    assert results.status_code == 409

    # The worker is free again: a small job runs to completion.
    small = {**slow_job_body, "query_indices": [0], "method": {"name": "grad_dot"}}
    assert wait(client, submit(client, small).headers["location"], timeout=60)["state"] == "succeeded"


def test_cancel_queued_job_is_immediate(client, slow_job_body):
    """No worker consumes the queue here, so the job stays queued until cancelled."""
    location = submit(client, slow_job_body).headers["location"]
    job = client.post(location + "/cancel").json()
    assert job["state"] == "cancelled"
    assert client.delete(location).status_code == 204
    assert client.get(location).status_code == 404


def test_kill9_during_sharded_job_loses_at_most_a_shard(
    client, worker_factory, slow_job_body, integration_settings
):
    """A fanned-out job survives a SIGKILLed worker: its running shard re-runs, the job completes once."""
    from app.db.models import JobShard

    first = worker_factory()
    body = {**slow_job_body, "execution": {"train_shard_size": 500}}
    location = submit(client, body).headers["location"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(location).json()
        if (
            job["progress"].get("phase") == "shards"
            and job["progress"].get("shard_phase") == "train_gradients"
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no shard ever ran: {job}")
    first.kill9()
    worker_factory()
    job = wait(client, location, timeout=300)
    assert job["state"] == "succeeded", job

    engine = create_engine(integration_settings.resolved_database_url)
    with engine.connect() as conn:
        shards = conn.execute(
            select(JobShard.state, JobShard.attempt)
            .where(JobShard.job_id == job["id"])
            .order_by(JobShard.index)
        ).all()
        n_results = conn.scalar(
            select(func.count()).select_from(InfluenceResult).where(InfluenceResult.job_id == job["id"])
        )
    engine.dispose()
    assert [s.state for s in shards] == ["succeeded"] * 3
    assert max(s.attempt for s in shards) == 2, "the killed shard ran again"
    assert n_results == 1


def test_merges_of_a_fanned_out_job_are_capped(client, slow_job_body, integration_settings):
    """A merge whose worker dies leaves the job running; each re-published merge counts, a duplicate of a
    live (heartbeating) merge is turned away, and after max_attempts dead merges the job fails."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from app.db.base import utcnow
    from app.db.models import Job, JobShard
    from app.services import shards as shards_service

    job = submit(client, slow_job_body).json()  # no worker consumes here: it stays queued
    engine = create_engine(integration_settings.resolved_database_url)

    def update_job(**values) -> None:
        with Session(engine) as session, session.begin():
            session.execute(Job.__table__.update().where(Job.id == job["id"]).values(**values))

    with Session(engine) as session, session.begin():
        row = session.get(Job, job["id"])
        row.state, row.attempt, row.shards_total, row.shards_done = "running", 1, 2, 2
        session.add_all(
            JobShard(job_id=job["id"], index=i, train_lo=i, train_hi=i + 1, state="succeeded")
            for i in range(2)
        )
    limit = integration_settings.max_attempts
    long_ago = utcnow() - timedelta(seconds=10 * integration_settings.lease_seconds)
    for merge in range(1, limit + 1):
        ready = shards_service.finalize_claim(integration_settings, job["id"])
        assert ready is not None and len(ready[1]) == 2
        assert shards_service.finalize_claim(integration_settings, job["id"]) is None  # live: a duplicate
        shards_service.merge_heartbeat(integration_settings, ready[0], None)
        with Session(engine) as session:
            assert session.get(Job, job["id"]).merge_attempts == merge
        update_job(heartbeat_at=long_ago, updated_at=long_ago)  # its worker died mid-merge
        _, republished = shards_service.sweep(integration_settings)
        with Session(engine) as session:  # the API server's own sweeper (every second) may get there first
            refreshed = session.get(Job, job["id"]).updated_at > long_ago
        assert job["id"] in republished or refreshed  # a sweeper handed the merge out again
        update_job(heartbeat_at=long_ago)
    assert shards_service.finalize_claim(integration_settings, job["id"]) is None
    failed = client.get(f"/v1/influence-jobs/{job['id']}").json()
    engine.dispose()
    assert failed["state"] == "failed", failed
    assert failed["error"]["type"].endswith("merge-failed") and str(limit) in failed["error"]["detail"]


def test_a_cancel_requested_just_before_fan_out_ends_the_job_cancelled(
    client, slow_job_body, integration_settings
):
    """A cancel that lands after the worker's last heartbeat but before the hand-over to shards: the
    shards would never start (their claim refuses a cancelled job) and a fanned-out job has no lease to
    expire, so a hand-over would leave it running for good. The job ends cancelled, with no shards."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from app.db.base import utcnow
    from app.db.models import Job, JobShard
    from app.estimators.sharding import ShardPlan
    from app.services import jobs as jobs_service
    from worker.runner import _hand_over

    job = submit(client, slow_job_body).json()  # no worker consumes here
    engine = create_engine(integration_settings.resolved_database_url)
    with Session(engine) as session, session.begin():  # claimed by "this process", then cancelled
        row = session.get(Job, job["id"])
        row.state, row.attempt, row.worker_id = "running", 1, "w"
        row.lease_expires_at = utcnow() + timedelta(minutes=5)
    assert client.post(f"/v1/influence-jobs/{job['id']}/cancel").status_code == 202
    plans = [ShardPlan(0, 0, 500, None), ShardPlan(1, 500, 1000, None)]
    claim = jobs_service.Claim(job["id"], "influence", 1)
    assert _hand_over(integration_settings, claim, plans, None) == "cancelled"
    with engine.connect() as conn:
        n_shards = conn.scalar(select(func.count()).select_from(JobShard).where(JobShard.job_id == job["id"]))
    engine.dispose()
    assert n_shards == 0
    assert client.get(f"/v1/influence-jobs/{job['id']}").json()["state"] == "cancelled"


def test_a_job_whose_worker_is_lost_on_every_attempt_fails_with_worker_lost(
    client, slow_job_body, integration_settings
):
    """The sweeper re-queues a running job whose lease expired until max_attempts, then fails it."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from app.db.base import utcnow
    from app.db.models import Job
    from app.services import jobs as jobs_service

    job = submit(client, slow_job_body).json()  # no worker consumes here
    engine = create_engine(integration_settings.resolved_database_url)
    expired = utcnow() - timedelta(seconds=1)
    limit = integration_settings.max_attempts
    for attempt in range(1, limit + 1):
        with Session(engine) as session, session.begin():  # a worker claims it, then dies
            row = session.get(Job, job["id"])
            assert row.state == "queued", row.state
            row.state, row.attempt, row.lease_expires_at, row.worker_id = "running", attempt, expired, "w"
        jobs_service.sweep(integration_settings)
    engine.dispose()
    failed = client.get(f"/v1/influence-jobs/{job['id']}").json()
    assert failed["state"] == "failed", failed
    assert failed["error"]["type"].endswith("worker-lost")
    assert f"on all {limit} attempts" in failed["error"]["detail"]


def _fanned_out(engine, job_id: str, shard_attempt: int = 1) -> None:
    """What fan_out commits: the job hands its lease over to two shards, the first one running."""
    from sqlalchemy.orm import Session

    from app.db.models import Job, JobShard

    with Session(engine) as session, session.begin():
        row = session.get(Job, job_id)
        row.state, row.attempt, row.shards_total, row.shards_done, row.lease_expires_at = (
            "running",
            1,
            2,
            0,
            None,
        )
        session.add_all(
            [
                JobShard(
                    job_id=job_id, index=0, train_lo=0, train_hi=500, state="running", attempt=shard_attempt
                ),
                JobShard(job_id=job_id, index=1, train_lo=500, train_hi=1000, state="queued"),
            ]
        )


def test_a_cancel_that_read_the_job_before_its_fan_out_ends_it(client, slow_job_body, integration_settings):
    """The API reads a running job that has not fanned out; the worker fans it out before the cancel
    writes: the cancel must end the fanned-out job (a bare flag would never be acted on)."""
    from sqlalchemy.orm import Session

    from app.db.models import Job, JobShard
    from app.services import jobs as jobs_service

    job_id = submit(client, slow_job_body).json()["id"]  # no worker consumes here
    engine = create_engine(integration_settings.resolved_database_url)
    with Session(engine) as session, session.begin():
        session.get(Job, job_id).state = "running"
    with Session(engine) as api:
        read = api.get(Job, job_id)  # what the cancel request saw: running, not fanned out
        assert read.state == "running" and read.shards_total == 0
        _fanned_out(engine, job_id)
        assert jobs_service.request_cancel(api, read).state == "cancelled"
    with engine.connect() as conn:
        shards = conn.execute(select(JobShard.index, JobShard.state).where(JobShard.job_id == job_id)).all()
    engine.dispose()
    assert sorted(shards) == [(0, "running"), (1, "cancelled")]  # the running one sees it at its heartbeat


def test_late_deliveries_of_a_fanned_out_job_change_nothing(client, slow_job_body, integration_settings):
    """After the hand-over, the job's last heartbeat must not give it a lease again, and a shard attempt
    that was superseded by a re-run must not end the job when it fails."""
    from app.db.models import Job, JobShard
    from app.estimators.sharding import ShardPlan
    from app.services import jobs as jobs_service
    from app.services import shards as shards_service

    job_id = submit(client, slow_job_body).json()["id"]  # no worker consumes here
    engine = create_engine(integration_settings.resolved_database_url)
    _fanned_out(engine, job_id, shard_attempt=2)
    with pytest.raises(jobs_service.LeaseLost):
        jobs_service.heartbeat(integration_settings, jobs_service.Claim(job_id, "influence", 1), None)
    with engine.connect() as conn:
        shard_id = conn.scalar(select(JobShard.id).where(JobShard.job_id == job_id, JobShard.index == 0))
    stale = shards_service.ShardClaim(shard_id, job_id, 1, ShardPlan(0, 0, 500, None))
    shards_service.stop_job(integration_settings, stale, "failed", {"code": "internal-error"})
    with engine.connect() as conn:
        job = conn.execute(select(Job.state, Job.lease_expires_at).where(Job.id == job_id)).one()
        shards = conn.execute(select(JobShard.index, JobShard.state).where(JobShard.job_id == job_id)).all()
    with engine.begin() as conn:  # leave nothing running for the sweepers
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(state="cancelled"))
    engine.dispose()
    assert tuple(job) == ("running", None)
    assert sorted(shards) == [(0, "running"), (1, "queued")]


def test_a_training_job_whose_message_was_lost_is_republished(client, integration_settings):
    """Training jobs are aged by the sweeper like influence jobs (they were created without enqueued_at,
    so a lost message left them queued until an API process restarted)."""
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import Job
    from app.services import jobs as jobs_service

    train = builtin(client, "sklearn:breast_cancer")
    spec = {
        "name": "lost-message",
        "architecture": {"name": "linear", "params": {"in_features": 30, "num_classes": 2}},
        "recipe": {"epochs": 1},
        "train_dataset_id": train["id"],
    }
    model = register_model(client, spec)
    assert model.status_code == 201, model.text
    job_id = model.json()["training_job_id"]
    engine = create_engine(integration_settings.resolved_database_url)
    long_ago = utcnow() - timedelta(seconds=10 * integration_settings.requeue_queued_after_seconds)
    with engine.begin() as conn:
        assert conn.scalar(select(Job.enqueued_at).where(Job.id == job_id)) is not None
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(enqueued_at=long_ago))
    published = jobs_service.sweep(integration_settings)
    with engine.begin() as conn:  # no worker here: end it so no later module's worker trains it
        # the API server's own sweeper (every second) may have re-published it first
        refreshed = conn.scalar(select(Job.enqueued_at).where(Job.id == job_id)) > long_ago
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(state="cancelled"))
    engine.dispose()
    assert job_id in published or refreshed


def test_a_running_jobs_status_poll_is_answered_304_between_changes(
    client, slow_job_body, integration_settings
):
    """Its duration grows with every request; the weak ETag leaves it out, so a poll that changes
    nothing else is a 304."""
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import Job

    job_id = submit(client, slow_job_body).json()["id"]  # no worker consumes here
    engine = create_engine(integration_settings.resolved_database_url)
    with engine.begin() as conn:
        started = utcnow() - timedelta(seconds=5)
        conn.execute(
            Job.__table__.update().where(Job.id == job_id).values(state="running", started_at=started)
        )
    url = f"/v1/influence-jobs/{job_id}"
    first = client.get(url)
    assert first.json()["duration_seconds"] >= 5
    time.sleep(0.05)
    assert client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    assert client.get(url).json()["duration_seconds"] > first.json()["duration_seconds"]
    with engine.begin() as conn:  # leave nothing running for the sweepers
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(state="cancelled"))
    engine.dispose()


def test_a_job_waiting_for_its_tenants_running_slot_keeps_one_message(api_server, integration_settings):
    """At max_running_jobs the claim re-publishes the job with a countdown and bumps its enqueued_at,
    so the sweeper (which re-publishes queued jobs with an old enqueued_at) adds no second copy: each
    copy would keep retrying every few seconds for as long as the job waits."""
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import Job
    from app.services import jobs as jobs_service
    from tests.conftest import mint_key

    key = mint_key(integration_settings, "tenant-one-slot", limits={"max_running_jobs": 1})
    engine = create_engine(integration_settings.resolved_database_url)
    with api_server.client(key) as one_slot:
        train = builtin(one_slot, "sklearn:digits", "train")
        linear = {"name": "linear", "params": {"in_features": 64, "num_classes": 10}}
        weights = init_model("linear", linear["params"], seed=0).state_dict()
        model = register_model(one_slot, {"name": "one-slot", "architecture": linear}, weights=weights)
        body = {
            "model_id": model.json()["id"],
            "train_dataset_id": train["id"],
            "method": {"name": "grad_dot"},
        }
        running, waiting = (submit(one_slot, {**body, "query_indices": [i]}).json()["id"] for i in range(2))
    # old, but not yet old enough for the API server's own sweeper (every second) to re-publish it
    aging = utcnow() - timedelta(seconds=integration_settings.requeue_queued_after_seconds - 5)
    try:
        with engine.begin() as conn:
            conn.execute(
                Job.__table__.update()
                .where(Job.id == running)
                .values(state="running", attempt=1, lease_expires_at=utcnow() + timedelta(minutes=5))
            )
            conn.execute(Job.__table__.update().where(Job.id == waiting).values(enqueued_at=aging))
        before_claim = utcnow()
        assert jobs_service.claim(integration_settings, waiting, "w") is None  # the tenant is busy
        with engine.connect() as conn:  # its live message is the retry: the sweeper ages it from now
            assert conn.scalar(select(Job.enqueued_at).where(Job.id == waiting)) >= before_claim
    finally:
        with engine.begin() as conn:
            conn.execute(
                Job.__table__.update().where(Job.id.in_([running, waiting])).values(state="cancelled")
            )
        engine.dispose()


def test_a_shard_completion_retried_after_its_commit_landed_counts_once(
    client, slow_job_body, integration_settings
):
    """retry_transaction re-runs a completion whose commit succeeded but whose acknowledgement was
    lost: the retry sees its own result, counts nothing twice and still reports success (it returned
    False, so the last shard's merge waited for the sweeper)."""
    from app.db.models import Job, JobShard
    from app.estimators.sharding import ShardPlan
    from app.services import shards as shards_service

    job_id = submit(client, slow_job_body).json()["id"]  # no worker consumes here
    engine = create_engine(integration_settings.resolved_database_url)
    _fanned_out(engine, job_id)
    with engine.connect() as conn:
        shard_id = conn.scalar(select(JobShard.id).where(JobShard.job_id == job_id, JobShard.index == 0))
    claim = shards_service.ShardClaim(shard_id, job_id, 1, ShardPlan(0, 0, 500, None))
    try:
        assert shards_service.complete(integration_settings, claim, "artifact://a.npy", None, 1.0)
        assert shards_service.complete(integration_settings, claim, "artifact://a.npy", None, 1.0)
        late = shards_service.ShardClaim(shard_id, job_id, 2, claim.plan)  # another attempt's: refused
        assert not shards_service.complete(integration_settings, late, "artifact://b.npy", None, 1.0)
        with engine.connect() as conn:
            assert conn.scalar(select(Job.shards_done).where(Job.id == job_id)) == 1
    finally:
        with engine.begin() as conn:
            conn.execute(Job.__table__.update().where(Job.id == job_id).values(state="cancelled"))
        engine.dispose()
