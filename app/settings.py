"""One settings object for API, worker and CLI, read from ``IA_*`` environment variables.

Two profiles share the code:

* **embedded** (default when ``IA_DATABASE_URL`` is unset): SQLite in
  ``IA_DATA_DIR`` and Celery's ``filesystem://`` broker in the same folder, so
  nothing but this package is needed.
* **production**: PostgreSQL (``IA_DATABASE_URL``), Redis (``IA_BROKER_URL``)
  and a shared artifact directory (``IA_ARTIFACT_DIR``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # An empty variable means unset (IA_ARTIFACT_DIR= must not put artifacts in the working directory).
    model_config = SettingsConfigDict(
        env_prefix="IA_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    mode: Literal["auto", "embedded", "server"] = Field(
        "auto",
        description="embedded: SQLite and the filesystem broker under data_dir (refuses database_url); "
        "server: needs database_url and broker_url, so a deployment missing them fails at start instead "
        "of running on SQLite; auto: embedded exactly when database_url is unset.",
    )
    data_dir: Path = Field(
        Path(".ia"), description="Root for the embedded profile's database, queue and artifacts."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset means SQLite under data_dir.")
    broker_url: str | None = Field(
        None, description="Celery broker URL; unset means filesystem:// under data_dir."
    )
    artifact_dir: Path | None = Field(
        None, description="Where artifacts live; unset means data_dir/artifacts."
    )

    # Limits checked at the door.
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload body (413 beyond).")
    max_json_body_bytes: int = Field(1024 * 1024, description="Largest accepted JSON request body.")
    max_job_cost: float = Field(
        2e14,
        description="Refuse jobs whose n_train * n_query * n_parameters * checkpoints (plus an LDS "
        "evaluation's cost) is above this.",
    )
    max_score_cells: float = Field(
        2e8,
        gt=0,
        description="Refuse jobs that score n_train * n_query cells above this (4 bytes a cell in float32: "
        "the worker holds the whole m x n matrix)",
    )
    idempotency_key_ttl_seconds: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long an Idempotency-Key names its job; after that the key may name a new request.",
    )
    max_model_parameters: int = Field(
        50_000_000, description="Refuse weights with more parameters than this."
    )
    max_query_indices: int = Field(100_000, description="Most query indices a job may list.")
    max_group_rows: int = Field(
        1_000_000, ge=1, description="Most training rows a job's groups may list, over all groups."
    )

    # Tenants, API keys and quotas (defaults; a tenant's own limits override them).
    api_key_pepper: SecretStr | None = Field(
        None,
        description=(
            "Secret keying the API-key hashes; required with database_url. Embedded mode, unset: "
            "generated once into data_dir/api-key-pepper."
        ),
    )
    auth_cache_seconds: float = Field(
        5.0, description="How long an API process trusts a verified key before checking it again (0: never)."
    )
    tenant_max_active_jobs: int = Field(20, description="Queued plus running jobs per tenant (429 beyond).")
    tenant_max_running_jobs: int = Field(
        2, description="Jobs per tenant computing at once; more wait queued."
    )
    tenant_max_storage_bytes: int = Field(
        20 * 1024**3, description="Stored dataset and model bytes per tenant, trained weights too (413)."
    )
    tenant_max_compute_seconds_per_day: float = Field(
        0.0,
        ge=0,
        description="Compute seconds (jobs' and shards' running time) a tenant may use in any 24 hours; "
        "a submission beyond it gets 429 (0 = no limit).",
    )
    tenant_read_requests_per_second: int = Field(200, description="GET/HEAD requests per second per tenant.")
    tenant_write_requests_per_second: int = Field(50, description="Other requests per second per tenant.")
    rate_limit_storage_url: str | None = Field(
        None,
        description="Where request counters live (redis://...), shared by API processes; unset: in-process.",
    )

    # Job execution.
    compute_queue: str = Field(
        "default", description="Celery queue compute tasks go to ('gpu' on GPU workers)."
    )
    lease_seconds: float = Field(
        60.0, description="A running job whose heartbeat is older than this is re-queued."
    )
    heartbeat_seconds: float = Field(2.0, description="Minimum interval between progress/heartbeat writes.")
    max_attempts: int = Field(3, description="Deliveries a job gets before it is failed.")
    sweep_interval_seconds: float = Field(
        10.0, description="How often the API process runs the lease sweeper."
    )
    requeue_queued_after_seconds: float = Field(
        300.0, description="Re-publish a queued job whose message has not been picked up for this long."
    )
    worker_max_tasks_per_child: int = Field(
        100,
        ge=0,
        description="Tasks a worker pool process runs before it is replaced (0 = never). Compute runs in a "
        "fresh sandboxed child per task either way; this only bounds the supervisor's own growth.",
    )
    worker_max_memory_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="A worker pool process whose peak resident memory passed this is replaced after its "
        "task (0 = no limit).",
    )
    worker_soft_shutdown_timeout: float = Field(
        8.0,
        ge=0,
        description="On a cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT) a worker gives its "
        "running tasks this many seconds to finish, then cancels them so their messages go back to the queue "
        "(0 = cancel at once). Keep it below the supervisor's kill grace period (Docker's default: 10 s).",
    )
    task_soft_time_limit: int = Field(3 * 3600, description="Seconds before a task is asked to stop.")
    task_time_limit: int = Field(3 * 3600 + 300, description="Seconds before a task's process is killed.")
    chunk_size: int = Field(256, description="Most examples per per-sample-gradient chunk.")
    memory_budget_bytes: int = Field(
        2 * 1024**3,
        description="Per-job working memory for gradient chunks; lowers the chunk size for big models.",
    )
    train_shard_size: int = Field(
        0,
        description="Default training rows per shard; a job over more rows fans out (0 = never by default).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the worker computes.")
    torch_threads: int = Field(0, description="torch intra-op threads in the worker (0 = torch default).")

    # Sandboxed compute (worker/sandbox.py): limits of the child process each job or shard runs in.
    sandbox_wall_seconds: float = Field(
        3 * 3600 - 300,
        gt=0,
        description="Wall-clock limit of a compute child (keep it below IA_TASK_SOFT_TIME_LIMIT).",
    )
    sandbox_cpu_seconds: int = Field(
        24 * 3600, ge=1, description="RLIMIT_CPU of a compute child: CPU seconds summed over its threads."
    )
    sandbox_memory_bytes: int = Field(
        16 * 1024**3,
        ge=0,
        description="RLIMIT_AS of a compute child on CPU-only workers (0 = none; never set with CUDA).",
    )
    sandbox_max_file_bytes: int = Field(
        8 * 1024**3, ge=1024, description="RLIMIT_FSIZE of a compute child: the largest file it may write."
    )
    sandbox_max_open_files: int = Field(256, ge=32, description="RLIMIT_NOFILE of a compute child.")
    sandbox_max_processes: int = Field(
        512,
        ge=16,
        description="RLIMIT_NPROC headroom of a compute child: the processes and threads it may add to "
        "those its user runs when it starts (the kernel does not enforce it for root).",
    )
    sandbox_nice: int = Field(
        10, ge=0, le=19, description="Niceness added to a compute child, so the API keeps a core."
    )
    sandbox_network: bool = Field(
        True, description="Give compute children an empty network namespace (when `unshare --net` works)."
    )
    sandbox_filesystem: bool = Field(
        True,
        description="Confine CPU compute children with Landlock (Linux 5.13+): they read only their inputs "
        "and the Python runtime, write only their scratch folder, and open no TCP connection.",
    )
    sandbox_scratch_dir: Path | None = Field(
        None, description="Where compute children's private scratch folders go; unset = the temp dir."
    )

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _mode_matches_urls(self) -> Settings:
        if self.mode == "server" and not (self.database_url and self.broker_url):
            missing = [
                n
                for n, v in (("IA_DATABASE_URL", self.database_url), ("IA_BROKER_URL", self.broker_url))
                if not v
            ]
            raise ValueError(f"IA_MODE=server needs {' and '.join(missing)}")
        if self.mode == "embedded" and self.database_url:
            raise ValueError("IA_MODE=embedded runs on SQLite under IA_DATA_DIR: unset IA_DATABASE_URL")
        return self

    @property
    def embedded(self) -> bool:
        return not self.database_url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ia.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def queue_dir(self) -> Path:
        return (self.data_dir / "queue").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
