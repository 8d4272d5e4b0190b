"""The worker's heartbeat thread: a lost lease, and a database it cannot reach for a whole lease."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from app.estimators import Cancelled
from app.services.jobs import LeaseLost
from app.settings import Settings
from worker.runner import Reporter

SETTINGS = Settings(heartbeat_seconds=0.02, lease_seconds=0.3)


def _wait(event, timeout: float = 5.0) -> float:
    started = time.monotonic()
    assert event.wait(timeout), "the heartbeat thread never set the flag"
    return time.monotonic() - started


def test_work_stops_once_no_heartbeat_succeeded_for_a_lease():
    calls = []

    def unreachable(settings, claim, progress):
        calls.append(time.monotonic())
        raise OperationalError("UPDATE job", {}, ConnectionRefusedError("database down"))

    with Reporter(SETTINGS, "claim", beat=unreachable) as reporter:
        reporter("train_gradients", 1, 10)  # fine while the lease has slack
        waited = _wait(reporter.lost)
        with pytest.raises(LeaseLost):
            reporter("train_gradients", 2, 10)
    assert SETTINGS.lease_seconds * 0.9 <= waited < SETTINGS.lease_seconds + 1.0
    assert len(calls) >= 3  # it kept retrying until the lease ran out


def test_a_database_blip_shorter_than_the_lease_is_ridden_out():
    failures = iter([True, True, False, True, False] + [False] * 1000)

    def flaky(settings, claim, progress):
        if next(failures):
            raise OperationalError("UPDATE job", {}, ConnectionRefusedError("blip"))
        return False

    with Reporter(SETTINGS, "claim", beat=flaky) as reporter:
        time.sleep(3 * SETTINGS.lease_seconds)
        assert not reporter.lost.is_set() and not reporter.cancel.is_set()
        reporter("scores", 1, 1)


def test_lease_lost_and_cancel_requests_reach_the_callback():
    def lost(settings, claim, progress):
        raise LeaseLost(claim)

    with Reporter(SETTINGS, "claim", beat=lost) as reporter:
        _wait(reporter.lost)
        with pytest.raises(LeaseLost):
            reporter.check()
    with Reporter(SETTINGS, "claim", beat=lambda s, c, p: True) as reporter:
        _wait(reporter.cancel)
        with pytest.raises(Cancelled):
            reporter.check()
