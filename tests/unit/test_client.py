"""The Python client's retry policy (app/client.py); its behaviour against the real service is in
tests/integration/test_client.py. Here the transport answers as a struggling server would."""

from __future__ import annotations

import httpx
import pytest

from app.client import APIError, InfluenceClient


def _client(answers: list[httpx.Response], seen: list[httpx.Request]) -> InfluenceClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    return InfluenceClient("http://service", "key", transport=httpx.MockTransport(handle), max_backoff=0.01)


def _busy() -> httpx.Response:
    problem = {"type": "x/not-ready", "title": "Not ready", "status": 503, "code": "not-ready"}
    return httpx.Response(503, json=problem, headers={"Retry-After": "0"})


def test_reads_and_submissions_are_retried_with_the_same_idempotency_key():
    seen: list[httpx.Request] = []
    job = {"id": "j1", "state": "queued"}
    ia = _client([_busy(), _busy(), httpx.Response(200, json=job)], seen)
    assert ia.job("j1") == job and len(seen) == 3
    seen.clear()
    ia = _client([httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(202, json=job)], seen)
    assert ia.submit_job("m", "d", "grad_dot") == job
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 2 and len(keys) == 1  # the retry is the same submission
    assert seen[0].headers["Authorization"] == "Bearer key"


def test_other_writes_are_not_retried_and_problems_become_api_errors():
    seen: list[httpx.Request] = []
    ia = _client([_busy()], seen)
    with pytest.raises(APIError) as info:
        ia.delete_job("j1")
    assert len(seen) == 1 and info.value.status == 503 and info.value.code == "not-ready"
    errors = [{"pointer": "/method/name", "detail": "x"}]
    body = {"code": "invalid-request", "detail": "bad", "errors": errors}
    ia = _client([httpx.Response(422, json=body)], seen)
    with pytest.raises(APIError, match="/method/name") as info:
        ia.submit_job("m", "d", "nope")
    assert info.value.errors[0]["pointer"] == "/method/name"
    ia = _client([httpx.Response(502, text="<html>bad gateway</html>")] * 6, seen)
    with pytest.raises(APIError) as info:
        ia.job("j1")
    assert info.value.status == 502 and "bad gateway" in info.value.detail


def test_a_retry_after_longer_than_max_backoff_is_raised_at_once():
    """A daily compute quota answers Retry-After in minutes: retrying within max_backoff cannot help."""
    seen: list[httpx.Request] = []
    quota = {"code": "compute-quota-exceeded", "detail": "the tenant used its compute for today"}
    ia = _client([httpx.Response(429, json=quota, headers={"Retry-After": "600"})], seen)
    with pytest.raises(APIError) as info:
        ia.submit_job("m", "d", "grad_dot")
    assert len(seen) == 1 and info.value.code == "compute-quota-exceeded"


def test_error_bodies_that_are_not_problem_objects_keep_status_and_text():
    seen: list[httpx.Request] = []
    ia = _client([httpx.Response(400, json=["not", "an", "object"])], seen)
    with pytest.raises(APIError) as info:
        ia.delete_job("j1")
    assert info.value.status == 400 and "not" in info.value.detail


def test_a_failed_training_names_the_training_job():
    from app.client import JobFailed

    seen: list[httpx.Request] = []
    model = {"id": "model-1", "state": "failed", "training_job_id": "job-7", "error": {"detail": "diverged"}}
    ia = _client([httpx.Response(200, json=model)], seen)
    with pytest.raises(JobFailed) as info:
        ia.wait_model("model-1")
    assert info.value.job["id"] == "job-7" and "diverged" in str(info.value)
