"""The Celery application the worker runs: ``celery -A worker.celery_app worker``."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init

from app.dispatch import celery_config
from app.settings import get_settings

celery_app = Celery("influence-worker", include=["worker.tasks"])
celery_app.conf.update(celery_config(get_settings()))
app = celery_app


@worker_init.connect
def _warm_up_before_forking(**_kwargs) -> None:
    """Each job runs in a freshly forked child; initialise torch.func once here, in the parent (CPU only)."""
    from app.estimators.gradients import warm_up

    warm_up()
