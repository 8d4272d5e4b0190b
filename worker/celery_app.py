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
    """Each job runs in a freshly forked child; initialise torch.func once here, in the parent (CPU only).

    Single-threaded on purpose: an OpenMP thread pool started in the parent does not survive
    ``fork`` and would deadlock the children's first parallel region.
    """
    import torch

    from app.estimators.gradients import warm_up

    torch.set_num_threads(1)
    warm_up()
