"""Locust users for ``bench/load.py``: status polling and job submission at constant arrival rates.

Each user fires once per second (``constant_throughput(1)``), so N users make an open-ish
arrival rate of N requests/s as long as responses take under a second. Configured through
environment variables set by ``bench/load.py``.
"""

from __future__ import annotations

import json
import os

from locust import FastHttpUser, constant_throughput, events, task

HEADERS = {"Authorization": f"Bearer {os.environ['LOAD_API_KEY']}"}
POLL_JOB = os.environ["LOAD_POLL_JOB"]
SUBMIT_BODY = json.loads(os.environ["LOAD_SUBMIT_BODY"])
ACCEPTED: list[str] = []


class Poller(FastHttpUser):
    fixed_count = int(os.environ["LOAD_POLL_RPS"])
    wait_time = constant_throughput(1)

    @task
    def poll(self) -> None:
        self.client.get(f"/v1/training-jobs/{POLL_JOB}", headers=HEADERS, name="GET /v1/training-jobs/{id}")


class Submitter(FastHttpUser):
    fixed_count = int(os.environ["LOAD_SUBMIT_RPS"])
    wait_time = constant_throughput(1)

    @task
    def submit(self) -> None:
        with self.client.post(
            "/v1/influence-jobs",
            json=SUBMIT_BODY,
            headers=HEADERS,
            name="POST /v1/influence-jobs",
            catch_response=True,
        ) as response:
            if response.status_code == 202:
                ACCEPTED.append(response.json()["id"])
                response.success()
            else:
                response.failure(f"{response.status_code}")


@events.test_stop.add_listener
def _save_accepted(**_kwargs) -> None:
    with open(os.environ["LOAD_ACCEPTED_FILE"], "w") as out:
        json.dump(ACCEPTED, out)
