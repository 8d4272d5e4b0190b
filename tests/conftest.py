"""Shared fixtures: a fresh PostgreSQL database and Redis DB per test session, real worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.cli import worker_argv
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("IA_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("IA_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _xdist_index() -> int:
    """This process's xdist worker number (0 without xdist, so ``-p no:xdist`` works too)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") else 0


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A brand-new database migrated to head with Alembic (which tests the migrations too)."""
    from app.db.migrate import upgrade

    name = f"ia_test_{_xdist_index()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    from app.db.session import _engine_for

    _engine_for.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """One Redis logical DB per xdist worker, flushed first (never the whole server)."""
    import redis

    url = f"{REDIS_URL}/{1 + _xdist_index()}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def integration_env(pg_url: str, redis_url: str, tmp_path_factory) -> dict[str, str]:
    """Environment for API and worker processes of the production profile, with test-sized timings."""
    data = tmp_path_factory.mktemp("ia-data")
    return {
        "IA_DATABASE_URL": pg_url,
        "IA_BROKER_URL": redis_url,
        "IA_DATA_DIR": str(data),
        "IA_ARTIFACT_DIR": str(data / "artifacts"),
        "IA_LEASE_SECONDS": "6",
        "IA_HEARTBEAT_SECONDS": "0.5",
        "IA_SWEEP_INTERVAL_SECONDS": "1",
        "IA_REQUEUE_QUEUED_AFTER_SECONDS": "30",
        "IA_TORCH_THREADS": "1",
        "IA_COMPUTE_QUEUE": f"test-{uuid.uuid4().hex[:6]}",
        "IA_API_KEY_PEPPER": f"test-pepper-{uuid.uuid4().hex}",
    }


@pytest.fixture(scope="session")
def integration_settings(integration_env: dict[str, str]) -> Settings:
    return Settings(**{k[3:].lower(): v for k, v in integration_env.items()})


class WorkerProcess:
    """A real ``celery worker`` process, started as ``influence worker`` starts it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                *worker_argv(self.env["IA_COMPUTE_QUEUE"], 1, "INFO"),
                "-n",
                f"test-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while b"ready." not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.2)
        return self

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill9(self) -> None:
        """SIGKILL the main process and its pool children, like a crashed machine."""
        for pid in [*self.children(), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def worker_factory(integration_env, tmp_path) -> Iterator:
    workers: list[WorkerProcess] = []

    def make() -> WorkerProcess:
        worker = WorkerProcess(integration_env, tmp_path / f"worker-{len(workers)}.log").start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


class ServerProcess:
    """``influence serve`` in a subprocess: the real API process, optionally with its own worker."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.api_key: str | None = None  # what client() sends unless told otherwise
        self.data_dir = Path(env.get("IA_DATA_DIR") or ".ia")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), *args],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready:\n" + self.log_path.read_text()[-4000:])

    def client(self, api_key: str | None = None, **kwargs) -> httpx.Client:
        """An HTTP client of this server that authenticates with ``api_key`` (default: the server's)."""
        key = api_key or self.api_key
        if key is None and (self.data_dir / "admin-api-key").exists():  # embedded: the key it created
            key = self.api_key = (self.data_dir / "admin-api-key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def mint_key(
    settings: Settings, tenant: str, scopes=("read", "write", "admin"), limits: dict | None = None, **kwargs
) -> str:
    """A key for ``tenant`` (created with ``limits`` if needed), minted in the database like the CLI does."""
    from app.db.session import session_scope
    from app.schemas.tenants import TenantCreate, TenantLimits
    from app.services import api_keys, tenants

    with session_scope(settings) as session:
        row = tenants.by_name(session, tenant) or tenants.create(
            session, TenantCreate(name=tenant, limits=TenantLimits(**(limits or {})))
        )
        return api_keys.create(session, settings, row, name="test", scopes=list(scopes), **kwargs)[1]


@pytest.fixture(scope="session")
def api_server(integration_env, integration_settings, tmp_path_factory) -> Iterator[ServerProcess]:
    """The API process of the production profile (PostgreSQL + Redis), without a worker; tenant-a's key."""
    server = ServerProcess(
        integration_env, tmp_path_factory.mktemp("api") / "api.log", "--no-worker"
    ).wait_ready()
    # Tests share tenant-a across modules: quotas stay out of their way (test_auth tests the quotas).
    roomy = {"max_active_jobs": 10_000, "max_running_jobs": 100, "read_requests_per_second": 10_000}
    server.api_key = mint_key(integration_settings, "tenant-a", limits=roomy)
    yield server
    server.stop()


@pytest.fixture
def client(api_server: ServerProcess) -> Iterator[httpx.Client]:
    with api_server.client() as c:
        yield c
