"""Thin task wrappers: arguments are ids, the runner does the work."""

from __future__ import annotations

import os
import socket

from app.dispatch import FINALIZE_TASK, RUN_JOB_TASK, RUN_SHARD_TASK
from app.settings import get_settings
from worker import runner
from worker.celery_app import celery_app


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return runner.run_job(get_settings(), job_id, worker_id=_worker_id())


@celery_app.task(name=RUN_SHARD_TASK, acks_late=True, ignore_result=True)
def run_shard(shard_id: str) -> str:
    return runner.run_shard(get_settings(), shard_id, worker_id=_worker_id())


@celery_app.task(name=FINALIZE_TASK, acks_late=True, ignore_result=True)
def finalize_job(job_id: str) -> str:
    return runner.finalize_job(get_settings(), job_id)
