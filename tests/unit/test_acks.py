"""Failed acknowledgements are retried (worker/acks.py), on kombu's in-memory virtual transport: the
same QoS bookkeeping as the Redis transport, whose failed ack left a prefetch slot taken for good."""

from __future__ import annotations

import pytest
from kombu import Connection, Exchange, Queue

from worker.acks import orphaned_deliveries, retry_acks


def _received(prefetch: int = 1):
    conn = Connection("memory://")
    channel = conn.channel()
    queue = Queue("acks-test", Exchange("acks-test"), "acks-test", channel=channel)
    queue.declare()
    producer = conn.Producer(channel)
    for i in range(2):
        producer.publish({"n": i}, exchange=queue.exchange, routing_key="acks-test", declare=[queue])
    channel.basic_qos(0, prefetch, False)
    got = []
    consumer = conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)], channel=channel)
    consumer.consume()
    conn.drain_events(timeout=1)
    return conn, channel, got


def test_an_unacknowledged_delivery_with_no_request_is_acknowledged_again():
    conn, channel, got = _received()
    try:
        assert len(got) == 1 and not channel.qos.can_consume()  # the one prefetch slot is taken
        # as after kombu's "Couldn't ack": the task is done, its message still held unacknowledged
        assert orphaned_deliveries(channel) == got
        assert retry_acks(channel) == 1
        assert got[0].acknowledged and orphaned_deliveries(channel) == []
        assert channel.qos.can_consume()  # the slot is free: the next message comes
        conn.drain_events(timeout=1)
        assert len(got) == 2
    finally:
        conn.release()


@pytest.mark.parametrize("registry", ["active_requests", "reserved_requests", "scheduled_requests"])
def test_a_delivery_backing_a_live_request_is_left_alone(monkeypatch, registry):
    """Running, waiting for a pool slot, or waiting for its countdown (a tenant-busy retry is published
    with one): acknowledging it early made Celery's own ack fail and could lose it on a restart."""
    from celery.worker import state

    conn, channel, got = _received()

    class Running:  # what the worker's request registry holds: the request and its message
        message = got[0]

    running = Running()
    monkeypatch.setattr(state, registry, {running})
    try:
        assert orphaned_deliveries(channel) == [] and retry_acks(channel) == 0
        assert not got[0].acknowledged
    finally:
        conn.release()


def test_a_delivery_is_acknowledged_only_once_it_stayed_orphaned_for_a_tick():
    """Celery settles a delivery (e.g. rejects it after a killed pool child) a moment after its request
    is gone; acknowledging it in that moment made Celery's own reject fail and stopped the worker."""
    conn, channel, got = _received()
    seen: set = set()
    try:
        assert retry_acks(channel, seen) == 0 and not got[0].acknowledged  # first sighting: wait
        assert seen == {got[0].delivery_tag}
        assert retry_acks(channel, seen) == 1 and got[0].acknowledged  # still orphaned a tick later
        assert retry_acks(channel, seen) == 0 and seen == set()
    finally:
        conn.release()


def test_a_delivery_settled_between_ticks_is_never_touched():
    conn, channel, got = _received()
    seen: set = set()
    try:
        assert retry_acks(channel, seen) == 0
        got[0].reject(requeue=True)  # Celery's own handling settles it before the next tick
        assert retry_acks(channel, seen) == 0 and seen == set()
    finally:
        conn.release()
