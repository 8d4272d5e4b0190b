"""The Celery application the worker runs: ``celery -A worker.celery_app worker``."""

from __future__ import annotations

from celery import Celery

from app.dispatch import celery_config
from app.settings import get_settings

celery_app = Celery("influence-worker", include=["worker.tasks"])
celery_app.conf.update(celery_config(get_settings()))
app = celery_app
