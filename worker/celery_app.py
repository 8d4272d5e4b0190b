"""The Celery application the worker runs: ``celery -A worker.celery_app worker``."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from app.dispatch import celery_config
from app.settings import get_settings
from worker.acks import RetryFailedAcks

celery_app = Celery("influence-worker", include=["worker.tasks"])
celery_app.conf.update(celery_config(get_settings()))
celery_app.steps["consumer"].add(RetryFailedAcks)
app = celery_app


@worker_init.connect
def _protect_credentials(**_kwargs) -> None:
    """The main process holds the credentials too (pool processes fork from it): hide its memory."""
    from worker import sandbox

    sandbox.protect_supervisor()


@worker_process_init.connect
def _prestart_compute_child(**_kwargs) -> None:
    """Start the pool process's first sandboxed compute child now, while it waits for a task.

    The child's interpreter start and torch import (over a second) then overlap the queue wait
    instead of delaying the job; each task that takes a child starts the next one
    (``sandbox.acquire``). A finalize task leaves it unused; it is stopped on exit.
    """
    from worker import sandbox

    sandbox.prestart(get_settings())


@worker_process_shutdown.connect
def _stop_compute_child(**_kwargs) -> None:
    from worker import sandbox

    sandbox.discard()
