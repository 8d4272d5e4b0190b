"""Publish "run job X" to Celery. The API only needs a broker client; tasks are addressed by name."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery

from app.settings import Settings

RUN_JOB_TASK = "ia.run_job"
RUN_SHARD_TASK = "ia.run_shard"
FINALIZE_TASK = "ia.finalize_job"
log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Worker and client configuration (CONVENTIONS.md section 8)."""
    transport_options: dict[str, Any]
    broker = settings.resolved_broker_url
    if broker.startswith("filesystem://"):
        folder = settings.queue_dir
        for sub in ("in", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "in"),
            "data_folder_out": str(folder / "in"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,  # listing a folder is cheap; the default 1 s delays every job
        }
    else:
        transport_options = {
            # Must exceed the longest task, or Redis hands a running task to a second worker.
            "visibility_timeout": settings.task_time_limit + 600,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
        }
    return {
        "broker_url": broker,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,  # safe: the DB attempt counter caps re-runs
        "worker_prefetch_multiplier": 1,
        # Pool processes are reused (tasks compute in a per-task child, which takes its memory, GPU
        # memory included, when it exits); each starts the next task's child while the current runs.
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child or None,
        "worker_max_memory_per_child": settings.worker_max_memory_bytes // 1024 or None,  # KiB
        # A broker blip must not kill the running job (SIGTERM loses its work, and the runner records
        # it as failed). The unacked message goes back to the queue when the channel closes, and the
        # DB lease drops the second delivery while this worker heartbeats: never two runs at once.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A cold shutdown waits this long for running tasks, then cancels them; their unacked messages go
        # back to the queue at once instead of after the visibility timeout (RELIABILITY.md 4.1), and
        # the job runs again once its lease has expired (a redelivery before that is dropped).
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_timeout,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "task_default_queue": "default",
        "worker_hijack_root_logger": False,
    }


# A publisher gives a hung broker this long per socket operation (a consuming worker keeps
# celery_config's 5 s): with one retry a submit answers within seconds, and the sweeper re-publishes
# what did not go out (the job row is committed first).
PUBLISH_SOCKET_TIMEOUT = 2.0


@lru_cache(maxsize=4)
def _client(settings_json: str) -> Celery:
    settings = Settings.model_validate_json(settings_json)
    app = Celery("influence-client")
    config = celery_config(settings)
    options = config["broker_transport_options"]
    if "socket_timeout" in options:
        options.update(socket_timeout=PUBLISH_SOCKET_TIMEOUT, socket_connect_timeout=PUBLISH_SOCKET_TIMEOUT)
    app.conf.update(config)
    return app


def client(settings: Settings) -> Celery:
    return _client(settings.model_dump_json())


def warm_up(settings: Settings) -> None:
    """Load what the first publish would load lazily (some 60 Celery and kombu modules), offline."""
    app = client(settings)
    app.amqp.producer_pool  # noqa: B018 - each attribute imports its part of the send path
    app.Task, app.AsyncResult, app.backend, app.events.Dispatcher  # noqa: B018
    app.signature(RUN_JOB_TASK)
    with app.connection_for_write() as connection:  # a transport object; nothing connects
        connection.transport  # noqa: B018


def _publish(settings: Settings, task: str, object_id: str, countdown: float | None = None) -> bool:
    """Publish; a failure is logged, not raised: the row is committed and the sweeper re-publishes it."""
    try:
        client(settings).send_task(
            task,
            args=[object_id],
            queue=settings.compute_queue,
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.2},
        )
        return True
    except Exception:  # noqa: BLE001 - broker down: the sweeper retries (outbox)
        log.warning("could not publish %s(%s); the sweeper will retry", task, object_id, exc_info=True)
        return False


def enqueue_job(settings: Settings, job_id: str, countdown: float | None = None) -> bool:
    return _publish(settings, RUN_JOB_TASK, job_id, countdown)


def enqueue_shard(settings: Settings, shard_id: str) -> bool:
    return _publish(settings, RUN_SHARD_TASK, shard_id)


def enqueue_finalize(settings: Settings, job_id: str) -> bool:
    return _publish(settings, FINALIZE_TASK, job_id)
