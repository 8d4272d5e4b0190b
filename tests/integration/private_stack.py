"""A private PostgreSQL, Redis, API process and Celery workers for tests that crash, pause or starve them.

The machine's shared PostgreSQL and Redis must never be stopped, so fault tests run their own:
own ports, own data directories, processes addressed by PID. The artifact directory is a small
tmpfs so a test can fill it. :func:`running` tears everything down, also when a test fails.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import redis
from sqlalchemy import Engine, create_engine, func, select

from app.db.base import utcnow
from app.db.models import TERMINAL_STATES, InfluenceResult, Job, JobShard, QueryResult
from app.settings import Settings
from tests.conftest import ServerProcess, WorkerProcess, free_port, mint_key

ARTIFACT_FS_BYTES = 48 * 1024 * 1024


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's binaries (Debian layout: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


def _as_postgres(*argv: str) -> None:
    """initdb and the server refuse to run as root; run them as the ``postgres`` OS user."""
    done = subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


class PrivatePostgres:
    """A throwaway cluster: initdb in a temporary directory owned by ``postgres``, trust auth on loopback."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="ia-chaos-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        _as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"
        )

    def _ctl(self, *args: str) -> None:
        _as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args)

    @property
    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        return int(pidfile.read_text().split()[0]) if pidfile.exists() else None

    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._ctl("-l", str(self.root / "postgres.log"), "-o", options, "start")

    def stop_immediate(self) -> None:
        """SIGQUIT to the postmaster: no checkpoint, crash recovery on the next start."""
        self._ctl("-m", "immediate", "stop")

    def close(self) -> None:
        if self.running():
            self.stop_immediate()
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """``redis-server`` with an append-only file, so a crash keeps what it had fsynced (everysec)."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
        argv += ["--save", "", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(argv, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis did not start:\n" + (self.dir / "redis.log").read_text()[-2000:])
            time.sleep(0.05)

    def on_disk(self, text: str) -> bool:
        """Whether ``text`` is in the append-only file yet (everysec: within about a second)."""
        return any(text.encode() in f.read_bytes() for f in self.dir.rglob("*.aof"))

    def kill9(self) -> None:
        """A crash: nothing is flushed beyond what ``appendfsync everysec`` already wrote."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def messages(self) -> tuple[dict[str, list[str]], list[str]]:
        """Job/shard ids of the messages waiting in each queue, and of those delivered but not acked."""
        conn = self.client()
        waiting = {
            key.decode(): [_message_arg(m) for m in conn.lrange(key, 0, -1)]
            for key in conn.keys("*")
            if conn.type(key) == b"list"
        }
        unacked = [_message_arg(m, in_unacked=True) for m in conn.hvals("unacked")]
        return waiting, unacked


def _message_arg(raw: bytes, *, in_unacked: bool = False) -> str:
    """The id argument of a kombu-on-Redis task message (the unacked hash wraps it with exchange/key)."""
    message = json.loads(raw)
    if in_unacked:
        message = message[0]
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _kwargs, _embed = json.loads(body)
    return args[0]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return [d for c in children for d in (*_descendants(c), c)]


def signal_worker(worker: WorkerProcess, sig: int) -> None:
    """Signal the worker's main process and every descendant (pool children, their compute sandboxes)
    by PID, deepest first: SIGSTOP pauses the whole machine's worth of it."""
    for pid in [*_descendants(worker.proc.pid), worker.proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class ChaosStack:
    """The production profile on private services, with handles to break each piece."""

    def __init__(self, root: Path, cleanup: ExitStack) -> None:
        self.root = root
        self.pg = PrivatePostgres()
        cleanup.callback(self.pg.close)
        self.pg.start()
        (root / "redis").mkdir()
        self.redis = PrivateRedis(root / "redis")
        cleanup.callback(lambda: self.redis.running() and self.redis.kill9())
        self.redis.start()
        self.artifact_dir = root / "artifacts"
        self.artifact_dir.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={ARTIFACT_FS_BYTES}", "tmpfs", str(self.artifact_dir)],
            check=True,
        )
        cleanup.callback(subprocess.run, ["umount", "-l", str(self.artifact_dir)], check=False)
        self.filler = self.artifact_dir / "filler"
        self.env = {
            "IA_DATABASE_URL": self.pg.url,
            "IA_BROKER_URL": self.redis.url,
            "IA_DATA_DIR": str(root / "data"),
            "IA_ARTIFACT_DIR": str(self.artifact_dir),
            "IA_LEASE_SECONDS": "5",
            "IA_HEARTBEAT_SECONDS": "0.5",
            "IA_SWEEP_INTERVAL_SECONDS": "1",
            "IA_REQUEUE_QUEUED_AFTER_SECONDS": "10",
            "IA_TORCH_THREADS": "1",
            "IA_COMPUTE_QUEUE": "chaos",
            "IA_API_KEY_PEPPER": "chaos-pepper",
            "IA_SANDBOX_SCRATCH_DIR": str(root / "scratch"),
        }
        self.workers: list[WorkerProcess] = []
        cleanup.callback(self._stop_workers)
        self.api = ServerProcess(self.env, root / "api.log", "--no-worker")
        cleanup.callback(self.api.stop)
        self.api.wait_ready()
        self.settings = Settings(**{k[3:].lower(): v for k, v in self.env.items()})
        # Probes poll as fast as they can while a dependency is down: no request-rate limit in the way.
        unlimited = {"read_requests_per_second": 10**6, "write_requests_per_second": 10**6}
        self.api.api_key = mint_key(self.settings, "chaos", limits=unlimited)
        self.engine: Engine = create_engine(self.pg.url, pool_pre_ping=True)
        cleanup.callback(self.engine.dispose)

    def client(self) -> httpx.Client:
        """Every HTTP client of the chaos tests comes from here, with the chaos tenant's key."""
        return self.api.client()

    def worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.root / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker.start()

    def _stop_workers(self) -> None:
        for worker in self.workers:
            signal_worker(worker, signal.SIGCONT)
            worker.stop()

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc.poll() is None]

    def worker_of(self, job_id: str) -> tuple[WorkerProcess, int]:
        """The worker whose pool child holds the job's lease, and that child's PID."""
        with self.engine.connect() as conn:
            owner = conn.scalar(select(Job.worker_id).where(Job.id == job_id))
        child = int(owner.rsplit(":", 1)[1])
        for worker in self.live_workers():
            if child in worker.children():
                return worker, child
        raise AssertionError(f"no live worker runs job {job_id} (owner {owner})")

    def fill_disk(self) -> None:
        """Write a filler file until the artifact filesystem has no block left."""
        with open(self.filler, "wb", buffering=0) as out:
            for block in (1024 * 1024, 4096, 1):
                try:
                    while True:
                        out.write(b"\0" * block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

    def heal(self) -> None:
        """Undo whatever a (possibly failed) scenario left broken, so the next one starts healthy."""
        self.filler.unlink(missing_ok=True)
        if not self.pg.running():
            self.pg.start()
        if not self.redis.running():
            self.redis.start()
        else:
            os.kill(self.redis.proc.pid, signal.SIGCONT)  # a hang scenario that failed half-way
        for worker in self.live_workers():
            signal_worker(worker, signal.SIGCONT)
        if not self.live_workers():
            self.worker()

    def artifact_files(self) -> set[str]:
        return {str(p.relative_to(self.artifact_dir)) for p in (self.artifact_dir / "sha256").rglob("*")}

    def check_invariants(self, job_ids: Iterable[str], timeout: float = 180) -> dict[str, dict]:
        """After a fault: every accepted job ends, keeps its result exactly once, nothing is left behind.

        A message can stay in Redis' ``unacked`` hash after a crash until the visibility timeout
        (hours) restores it; that is harmless only if its job is already final, because the
        claim's guard then drops the redelivery. Ready queues must drain: a duplicate the
        sweeper published is consumed and dropped.
        """
        job_ids = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(Job.id, Job.state, Job.attempt, Job.error).where(Job.id.in_(job_ids))
                ).all()
            jobs = {r.id: r._asdict() for r in rows}
            assert set(jobs) == set(job_ids), f"accepted jobs missing: {set(job_ids) - set(jobs)}"
            pending = {i: j["state"] for i, j in jobs.items() if j["state"] not in TERMINAL_STATES}
            waiting, unacked = self.redis.messages()
            if not pending and not any(waiting.values()):
                break
            assert time.monotonic() < deadline, (
                f"after {timeout}s, jobs not final: {pending}; messages still queued: {waiting}"
            )
            time.sleep(0.5)

        now = utcnow()
        with self.engine.connect() as conn:
            results = dict(
                conn.execute(
                    select(InfluenceResult.job_id, func.count()).group_by(InfluenceResult.job_id)
                ).all()
            )
            attempts = dict(conn.execute(select(InfluenceResult.job_id, InfluenceResult.attempt)).all())
            query_rows = dict(
                conn.execute(select(QueryResult.job_id, func.count()).group_by(QueryResult.job_id)).all()
            )
            stale_jobs = conn.scalars(
                select(Job.id).where(Job.state == "running", Job.lease_expires_at < now)
            ).all()
            stale_shards = conn.scalars(
                select(JobShard.id).where(JobShard.state == "running", JobShard.lease_expires_at < now)
            ).all()
            states = dict(conn.execute(select(Job.id, Job.state)).all())
            states.update(conn.execute(select(JobShard.id, JobShard.state)).all())
        assert all(n <= 1 for n in results.values()), f"a job has two results: {results}"
        for job_id, job in jobs.items():
            if job["state"] == "succeeded":
                assert results.get(job_id) == 1, f"succeeded job {job_id} lost its result"
                assert attempts[job_id] == job["attempt"], f"{job_id}: result of a stale attempt"
                assert query_rows.get(job_id, 0) > 0, f"succeeded job {job_id} has no result rows"
            else:
                assert job_id not in results and job_id not in query_rows, (
                    f"{job_id} {job['state']} kept rows"
                )
        assert not stale_jobs and not stale_shards, (
            f"running with an expired lease: {stale_jobs, stale_shards}"
        )

        unfinished = [i for i in unacked if states.get(i) not in TERMINAL_STATES]
        assert not unfinished, f"unacked messages for jobs or shards that are not final: {unfinished}"
        leftovers = list((self.artifact_dir / "tmp").iterdir())
        assert not leftovers, f"staging files left behind: {leftovers}"
        return jobs


@contextmanager
def running(root: Path) -> Iterator[ChaosStack]:
    """Start the private stack with one worker; stop and delete all of it on the way out."""
    with ExitStack() as cleanup:
        stack = ChaosStack(root, cleanup)
        stack.worker()
        yield stack
