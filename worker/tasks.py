"""Thin task wrappers: arguments are ids, the runner does the work."""

from __future__ import annotations

import os
import socket

from app.dispatch import RUN_JOB_TASK
from app.settings import get_settings
from worker import runner
from worker.celery_app import celery_app


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return runner.run_job(get_settings(), job_id, worker_id=f"{socket.gethostname()}:{os.getpid()}")
