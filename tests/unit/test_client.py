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
    return httpx.Response(503, json=problem, headers={"Retry-After": "1"})


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
