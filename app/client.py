"""Python client of the influence service, for notebooks and scripts.

It speaks the public HTTP API only (the same routes as ``curl``) and turns its conventions into
Python: arrays in (``.npz`` datasets, safetensors weights), arrays out (score matrices as NumPy),
problem+json errors as :class:`APIError`, cursor pages as iterators, ``Retry-After`` honoured,
an ``Idempotency-Key`` on every submission so a retried submit never runs a job twice::

    from app.client import InfluenceClient

    with InfluenceClient("http://127.0.0.1:8000", api_key) as ia:
        train = ia.upload_dataset(X_train, y_train, name="train")
        model = ia.register_model("mlp-64", {"name": "mlp", "params": {...}}, weights=net.state_dict())
        job = ia.submit_job(model["id"], train["id"], {"name": "trak"}, query_dataset_id=test["id"])
        job = ia.wait(job["id"])
        for row in ia.results(job["id"]):
            print(row["query_index"], row["proponents"][:3])

Responses are the API's JSON objects (dicts), as the OpenAPI document at ``/docs`` describes.
It imports no server code: it runs wherever ``httpx``, ``numpy`` and ``safetensors`` do.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
_RETRY_STATUSES = frozenset({429, 502, 503, 504})


class APIError(Exception):
    """A problem+json answer (RFC 9457): ``status``, ``code``, ``title``, ``detail``, and ``errors``
    (``[{"pointer", "detail"}]``, the request fields at fault)."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        self.code: str = str(body.get("code") or body.get("type", "")).rsplit("/", 1)[-1]
        self.title: str = str(body.get("title", ""))
        self.detail: str = str(body.get("detail", self.title))
        self.errors: list[dict] = list(body.get("errors") or [])
        where = "; ".join(f"{e.get('pointer')}: {e.get('detail')}" for e in self.errors)
        super().__init__(f"{status} {self.code}: {self.detail}" + (f" ({where})" if where else ""))


class JobFailed(Exception):
    """A job that ended ``failed`` or ``cancelled`` while :meth:`InfluenceClient.wait` waited for it."""

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        error = job.get("error") or {}
        super().__init__(f"job {job.get('id')} {job.get('state')}: {error.get('detail') or error}")


def _npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def _safetensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    """torch tensors or NumPy arrays as a safetensors file (the only weight format the service takes)."""
    values = list(tensors.values())
    if values and all(isinstance(v, np.ndarray) for v in values):
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


class InfluenceClient:
    """A session with one service, as one tenant (its API key).

    Transient answers (429, 502-504, and connection errors) of reads are retried ``retries`` times,
    after the ``Retry-After`` the service sent (one longer than ``max_backoff`` seconds is raised at
    once); so are submissions, which carry an ``Idempotency-Key``. Other writes are not retried.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_backoff: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )
        self.retries, self.max_backoff = retries, max_backoff

    # ------------------------------------------------------------------ plumbing

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _backoff(self, response: httpx.Response | None, attempt: int) -> float:
        """Seconds to wait before the next attempt: the service's ``Retry-After``, else exponential."""
        header = response.headers.get("retry-after") if response is not None else None
        try:
            wait = float(header) if header is not None else 0.2 * 2**attempt
        except ValueError:
            wait = 0.2 * 2**attempt
        return max(wait, 0.0)

    def request(self, method: str, path: str, *, retry: bool | None = None, **kwargs) -> httpx.Response:
        """One API call; raises :class:`APIError` for a problem answer. ``retry`` defaults to True for
        GET/HEAD."""
        retry = method in ("GET", "HEAD") if retry is None else retry
        for attempt in range(self.retries + 1):
            last = attempt == self.retries or not retry
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(min(self._backoff(None, attempt), self.max_backoff))
                continue
            # a Retry-After past max_backoff (a daily compute quota: minutes) cannot be met by waiting
            # here: the error goes to the caller at once instead of after futile retries
            if response.status_code in _RETRY_STATUSES and not last:
                wait = self._backoff(response, attempt)
                if wait <= self.max_backoff:
                    time.sleep(wait)
                    continue
            if response.is_error:
                try:
                    body = response.json()
                except ValueError:
                    body = None
                if not isinstance(body, dict):  # not problem+json (a proxy's page, say)
                    body = {"title": response.reason_phrase, "detail": response.text[:500]}
                raise APIError(response.status_code, body)
            return response
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs) -> Any:
        return self.request(method, path, **kwargs).json()

    def pages(self, path: str, params: Mapping[str, Any] | None = None, *, page_size: int = 500) -> Iterator:
        """Every item of a cursor-paged listing, page after page."""
        query = {**(params or {}), "page_size": page_size}
        while True:
            page = self._json("GET", path, params=query)
            yield from page["items"]
            token = page.get("next_page_token")
            if not token:
                return
            query["page_token"] = token

    # ------------------------------------------------------------------ catalogue

    def me(self) -> dict:
        """This key's tenant, limits and usage."""
        return self._json("GET", "/v1/me")

    def estimators(self) -> list[dict]:
        """Every estimator with its parameters (JSON schema), self-influence support and group orders."""
        return self._json("GET", "/v1/estimators")

    def architectures(self) -> dict:
        """The registered architectures (with their parameter schemas) and the training recipe's schema."""
        return self._json("GET", "/v1/architectures")

    # ------------------------------------------------------------------ datasets

    def upload_dataset(
        self, X: np.ndarray, y: np.ndarray, *, name: str | None = None, ids: Sequence[int] | None = None
    ) -> dict:
        """Register arrays (features ``X`` with a leading example axis, labels ``y``, optional integer
        example ``ids``) as a dataset (sent as ``.npz``)."""
        arrays = {"X": np.asarray(X), "y": np.asarray(y)}
        if ids is not None:
            arrays["ids"] = np.asarray(ids, dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = {"name": name} if name else None
        files = {"file": ("data.npz", buffer.getvalue(), "application/octet-stream")}
        return self._json("POST", "/v1/datasets", files=files, data=data)

    def builtin_dataset(self, builtin: str, split: str = "all") -> dict:
        """A dataset shipped with the service, e.g. ``"sklearn:digits"``, split ``train``/``test``/``all``."""
        return self._json("POST", "/v1/datasets/builtin", json={"builtin": builtin, "split": split})

    def dataset(self, dataset_id: str) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def datasets(self) -> Iterator[dict]:
        return self.pages("/v1/datasets")

    # ------------------------------------------------------------------ models

    def register_model(
        self,
        name: str,
        architecture: Mapping[str, Any],
        *,
        weights: Mapping[str, Any] | None = None,
        checkpoints: Sequence[Mapping[str, Any]] = (),
        checkpoint_info: Sequence[Mapping[str, Any]] | None = None,
        initial_weights: Mapping[str, Any] | None = None,
        **spec: Any,
    ) -> dict:
        """Register a model of a server-side ``architecture`` (``{"name", "params"}``).

        ``weights`` and each of ``checkpoints`` are state dicts (torch tensors or NumPy arrays), sent
        as safetensors; ``checkpoint_info`` gives each checkpoint's ``step`` and ``learning_rate``.
        Other keyword arguments go into the model spec (``recipe``, ``task``, ...); a model with a
        ``recipe`` and a ``train_dataset_id`` but no weights is trained on the service
        (:meth:`wait_model`), from ``initial_weights`` when given (e.g. a ``lora_mlp``'s pretrained
        base and initial adapters).
        """
        body = {"name": name, "architecture": dict(architecture), **spec}
        if checkpoint_info is not None:
            body["checkpoints"] = [dict(c) for c in checkpoint_info]
        files = []
        if weights is not None:
            files.append(
                ("weights", ("weights.safetensors", _safetensors_bytes(weights), "application/octet-stream"))
            )
        if initial_weights is not None:
            blob = _safetensors_bytes(initial_weights)
            files.append(("initial_weights", ("initial.safetensors", blob, "application/octet-stream")))
        files += [
            (
                "checkpoints",
                (f"checkpoint-{i}.safetensors", _safetensors_bytes(c), "application/octet-stream"),
            )
            for i, c in enumerate(checkpoints)
        ]
        return self._json("POST", "/v1/models", data={"spec": json.dumps(body)}, files=files or None)

    def model(self, model_id: str) -> dict:
        return self._json("GET", f"/v1/models/{model_id}")

    def models(self) -> Iterator[dict]:
        return self.pages("/v1/models")

    def wait_model(self, model_id: str, *, timeout: float = 3600.0, poll: float = 0.5) -> dict:
        """Until a model trained on the service is ``ready``; :class:`JobFailed` when its training fails."""
        deadline = time.monotonic() + timeout
        while True:
            model = self.model(model_id)
            if model["state"] != "training":
                if model["state"] != "ready":
                    raise JobFailed({**model, "id": model.get("training_job_id")})
                return model
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model_id} still training after {timeout:.0f} s")
            time.sleep(poll)

    def delete_model(self, model_id: str) -> None:
        self.request("DELETE", f"/v1/models/{model_id}")

    # ------------------------------------------------------------------ influence jobs

    def submit_job(
        self,
        model_id: str,
        train_dataset_id: str,
        method: Mapping[str, Any] | str,
        *,
        query_dataset_id: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> dict:
        """Submit an influence job; returns it (``queued``). ``method`` is an estimator name or
        ``{"name", "params"}``; other fields (``query_indices``, ``output``, ``measurement``,
        ``execution``, ``evaluation``, ``checkpoint_ids``) are passed as the API documents them.
        A fresh ``Idempotency-Key`` is sent unless given, so the submission can be retried safely."""
        body: dict[str, Any] = {
            "model_id": model_id,
            "train_dataset_id": train_dataset_id,
            "method": {"name": method} if isinstance(method, str) else dict(method),
            **fields,
        }
        if query_dataset_id is not None:
            body["query_dataset_id"] = query_dataset_id
        key = idempotency_key or str(uuid.uuid4())
        return self._json(
            "POST", "/v1/influence-jobs", json=body, headers={"Idempotency-Key": key}, retry=True
        )

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/influence-jobs/{job_id}")

    def jobs(self, *, state: str | None = None, model_id: str | None = None) -> Iterator[dict]:
        params = {k: v for k, v in {"state": state, "model_id": model_id}.items() if v is not None}
        return self.pages("/v1/influence-jobs", params)

    def wait(self, job_id: str, *, timeout: float = 3600.0, raise_on_failure: bool = True) -> dict:
        """Poll until the job is terminal (the service's ``Retry-After`` sets the pace); returns it.

        :class:`JobFailed` when it ended ``failed`` or ``cancelled`` (unless ``raise_on_failure`` is
        False); ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.request("GET", f"/v1/influence-jobs/{job_id}")
            job = response.json()
            if job["state"] in TERMINAL_STATES:
                if raise_on_failure and job["state"] != "succeeded":
                    raise JobFailed(job)
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
            time.sleep(min(self._backoff(response, 0), 2.0, max(deadline - time.monotonic(), 0.0)))

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/influence-jobs/{job_id}/cancel", retry=True)

    def delete_job(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/influence-jobs/{job_id}")

    # ------------------------------------------------------------------ results

    def results(self, job_id: str, *, query_index: int | None = None) -> Iterator[dict]:
        """Per query: its top-k proponents and opponents (training rows with scores), in query order."""
        params = {"query_index": query_index} if query_index is not None else None
        return self.pages(f"/v1/influence-jobs/{job_id}/results", params)

    def results_page(self, job_id: str, *, page_size: int = 50, page_token: str | None = None) -> dict:
        """One page of :meth:`results` with the result's metadata (method, measurement, sign
        convention, orientation, sizes, details)."""
        params: dict[str, Any] = {"page_size": page_size}
        if page_token:
            params["page_token"] = page_token
        return self._json("GET", f"/v1/influence-jobs/{job_id}/results", params=params)

    def scores(self, job_id: str) -> np.ndarray:
        """The full query-major ``m x n`` score matrix (jobs submitted with ``keep_full_matrix``)."""
        return _npy(self.request("GET", f"/v1/influence-jobs/{job_id}/artifacts/scores").content)

    def self_influence(self, job_id: str) -> np.ndarray:
        """Self-influence of every training example (jobs submitted with ``self_influence``)."""
        return _npy(self.request("GET", f"/v1/influence-jobs/{job_id}/artifacts/self-influence").content)

    def group_scores(self, job_id: str) -> np.ndarray:
        """The ``m x G`` group-influence matrix (jobs submitted with ``output.groups``)."""
        return _npy(self.request("GET", f"/v1/influence-jobs/{job_id}/artifacts/group-scores").content)

    def values(self, job_id: str, *, order: str = "asc") -> Iterator[dict]:
        """A data-valuation job's value of every training example (``asc``: least valuable first)."""
        return self.pages(f"/v1/influence-jobs/{job_id}/values", {"order": order})
