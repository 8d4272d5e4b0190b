"""Acknowledgements that failed while the broker hung are retried, so the worker keeps consuming.

With ``acks_late`` a task's message is acknowledged after the task returns. When Redis does not
answer at that moment (a hang longer than the socket timeout), kombu logs "Couldn't ack" and gives
up, but the delivery still holds one of the worker's prefetch slots: with prefetch 1 the worker
never asks for another message again (celery/celery#2415). :class:`RetryFailedAcks` looks every few
seconds for such deliveries (held by the channel, not acknowledged, and no longer backing any request
of this worker) and acknowledges them again once the broker answers, which frees the slot.

Every delivery is acknowledged only after its task ran (or was turned away by the job's lease);
a failed reject is acknowledged too, since the database, not the broker, decides what runs again
(the sweeper re-publishes queued jobs and expired leases).

A delivery is acknowledged only once it has looked orphaned on two consecutive ticks. Celery itself
settles a delivery a moment after its request is gone (the reject after a pool child is killed
arrives through a promise); acknowledging it in between made that reject fail with
``MessageStateError``, which Celery treats as unrecoverable, and the worker stopped consuming.
"""

from __future__ import annotations

import logging

from celery import bootsteps
from celery.worker import state

log = logging.getLogger(__name__)

RETRY_INTERVAL_SECONDS = 2.0


def orphaned_deliveries(channel) -> list:
    """Messages the channel holds unacknowledged that no scheduled, reserved or running request stands
    for (a countdown message waits in the worker's timer as a scheduled request until it is due)."""
    qos = getattr(channel, "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if not delivered:
        return []
    dirty = getattr(qos, "_dirty", set())
    held = {request.message.delivery_tag for request in list(state.reserved_requests)}
    held |= {request.message.delivery_tag for request in list(state.active_requests)}
    held |= {request.message.delivery_tag for request in list(getattr(state, "scheduled_requests", ()))}
    return [
        message
        for tag, message in list(delivered.items())
        if tag not in held and tag not in dirty and not message.acknowledged
    ]


def retry_acks(channel, seen_before: set | None = None) -> int:
    """Acknowledge the orphaned deliveries again; returns how many went through.

    With ``seen_before`` (the delivery tags found orphaned on the previous tick, updated in place to
    this tick's), only deliveries orphaned on both ticks are acknowledged."""
    done = 0
    orphans = orphaned_deliveries(channel)
    if seen_before is not None:
        tags = {message.delivery_tag for message in orphans}
        orphans = [message for message in orphans if message.delivery_tag in seen_before]
        seen_before.clear()
        seen_before.update(tags)
    for message in orphans:
        try:
            message.ack()
        except Exception as exc:  # noqa: BLE001 - the broker still hangs: next round
            log.warning("acknowledging %r failed again (%r); retrying", message.delivery_tag, exc)
            continue
        done += 1
        log.info("acknowledged %r after an earlier failure", message.delivery_tag)
    return done


class RetryFailedAcks(bootsteps.StartStopStep):
    """Consumer step: retries failed acknowledgements every :data:`RETRY_INTERVAL_SECONDS`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self._timer = None
        self._orphaned: set = set()  # delivery tags orphaned on the previous tick

    def start(self, parent) -> None:
        self._timer = parent.timer.call_repeatedly(RETRY_INTERVAL_SECONDS, self._tick, (parent,))

    def stop(self, parent) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    shutdown = stop

    def _tick(self, parent) -> None:
        consumer = getattr(parent, "task_consumer", None)
        if consumer is not None:
            retry_acks(consumer.channel, self._orphaned)
