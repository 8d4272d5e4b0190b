"""RFC 9457 problem details as a plain exception, raisable from any layer.

The API renders :class:`ProblemError` as ``application/problem+json``; jobs
store :meth:`ProblemError.to_dict` in their ``error`` field. No web imports, so
storage, services and the worker can raise it too.

:data:`PROBLEM_TYPES` is the catalogue of every ``code`` the service emits (the ``type`` URI is
``PROBLEM_BASE_URI + code``); ``docs/problems.md`` is rendered from it
(``python -m app.problems > docs/problems.md``) and a test keeps both in step with the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROBLEM_BASE_URI = "https://influence-service.dev/problems/"


@dataclass(frozen=True)
class ProblemType:
    """One catalogued problem: the HTTP statuses it comes with, when it happens and what to do."""

    statuses: tuple[int, ...]
    description: str


_FILE = "An uploaded file"
PROBLEM_TYPES: dict[str, ProblemType] = {
    # --- the request
    "invalid-request": ProblemType(
        (422,),
        "The request body, a query parameter or a referenced resource is invalid; `errors` points at "
        "each bad field (JSON pointer). Fix the named fields and send again.",
    ),
    "invalid-parameters": ProblemType(
        (422,),
        "Estimator or architecture parameters failed validation; `errors` points into `method.params` "
        "or `spec.architecture.params`.",
    ),
    "bad-request": ProblemType(
        (400,), "The HTTP request itself is malformed (e.g. a broken multipart body)."
    ),
    "unsupported-media-type": ProblemType(
        (415,), "The request's Content-Type is not one this route accepts."
    ),
    "method-not-allowed": ProblemType((405,), "The route exists but not for this HTTP method; see `Allow`."),
    "not-found": ProblemType(
        (404,), "No such route, or no such dataset, model, job, tenant or API key visible to you."
    ),
    "precondition-failed": ProblemType(
        (412,), "A PATCH's `If-Match` names an ETag the resource no longer has: GET it again and retry."
    ),
    "idempotency-key-reused": ProblemType(
        (422,), "The `Idempotency-Key` was already used (within 24 h) with a different request body."
    ),
    "unstorable-value": ProblemType(
        (422,), "A value in the request is accepted by validation but refused by the database."
    ),
    "too-large": ProblemType(
        (413,), "The request body, an upload or its decoded data exceeds the configured size limit."
    ),
    # --- authentication, authorisation, quotas
    "unauthenticated": ProblemType(
        (401,), "No API key was sent (`Authorization: Bearer iak_...` or `X-API-Key`)."
    ),
    "invalid-api-key": ProblemType((401,), "The API key is malformed or unknown."),
    "api-key-revoked": ProblemType((401,), "The API key was revoked; ask an admin for a new one."),
    "api-key-expired": ProblemType((401,), "The API key's expiry time has passed."),
    "insufficient-scope": ProblemType(
        (403,), "The API key lacks the scope this route needs (read, write or admin)."
    ),
    "tenant-disabled": ProblemType((403,), "The key's tenant is disabled by an admin."),
    "rate-limited": ProblemType(
        (429,), "Too many requests per second for the tenant; wait `Retry-After` seconds."
    ),
    "job-quota-exceeded": ProblemType(
        (429,), "The tenant has its maximum of queued or running jobs; wait for some or cancel them."
    ),
    "compute-quota-exceeded": ProblemType(
        (429,), "The tenant's jobs used the daily compute allowance (a rolling 24 h window)."
    ),
    "storage-quota-exceeded": ProblemType(
        (413,), "The upload would take the tenant over its storage quota; delete datasets or models first."
    ),
    # --- uploaded files (datasets, weights, checkpoints)
    "unsupported-format": ProblemType(
        (415,),
        "The file is not one of the accepted formats: datasets as npz, safetensors or Parquet; weights "
        "as safetensors.",
    ),
    "pickle-refused": ProblemType(
        (415,),
        f"{_FILE} is a Python pickle (torch.save checkpoints and object arrays included); never loaded.",
    ),
    "executable-archive-refused": ProblemType(
        (415,),
        f"{_FILE} is a TorchScript, torch.export or other zip archive that can run code; never loaded.",
    ),
    "corrupt-file": ProblemType((422,), f"{_FILE} cannot be parsed in its declared format."),
    "compression-bomb": ProblemType(
        (422,), f"{_FILE} decompresses far beyond its size or beyond what its headers declare."
    ),
    "invalid-dtype": ProblemType(
        (422,), "An array or column has a type other than plain integers or floats."
    ),
    "missing-array": ProblemType((422,), "A required array (`X`, `y`) or tensor is absent from the file."),
    "missing-column": ProblemType((422,), "The Parquet file has no column of the given label or id name."),
    "unexpected-array": ProblemType((422,), "The file holds arrays other than `X`, `y` and `ids`."),
    "shape-mismatch": ProblemType((422,), "Array shapes do not fit together (rows of `X` vs labels, ids)."),
    "empty-dataset": ProblemType((422,), "The dataset has no examples."),
    "non-finite-values": ProblemType((422,), "The data or weights hold NaN or infinite values."),
    "null-values": ProblemType((422,), "A Parquet column holds nulls."),
    "duplicate-ids": ProblemType((422,), "Example ids are not unique."),
    "invalid-labels": ProblemType((422,), "Class labels are negative."),
    "weights-mismatch": ProblemType(
        (422,), "The weights' tensor names or shapes do not fit the architecture; `errors` lists each."
    ),
    # --- resources and jobs
    "conflict": ProblemType((409,), "The resource already exists (a tenant name, a checkpoint step)."),
    "model-in-use": ProblemType(
        (409,), "The model has queued or running jobs; cancel them before deleting it."
    ),
    "job-active": ProblemType((409,), "The job is queued or running; cancel it before deleting it."),
    "job-finished": ProblemType((409,), "The job already finished, so it cannot be cancelled."),
    "job-not-succeeded": ProblemType(
        (409,),
        "Results exist only for succeeded jobs; poll the job (queued/running answers carry `Retry-After`).",
    ),
    "job-too-large": ProblemType(
        (422,),
        "The job's score matrix or cost (n_train x n_query x parameters x checkpoints) exceeds the limit.",
    ),
    "evaluation-unsupported": ProblemType(
        (422,),
        "The requested evaluation (LDS) needs per-query scores, which this estimator does not produce.",
    ),
    "artifact-not-kept": ProblemType(
        (404,), "The job did not keep the requested artifact (e.g. the full matrix)."
    ),
    "no-group-scores": ProblemType((404,), "The job was submitted without `output.groups`."),
    "no-values": ProblemType((404,), "The job's estimator produces influence scores, not data values."),
    "training-cancelled": ProblemType(
        (409,), "A model's `error`: its server-side training job was cancelled; register the model again."
    ),
    # --- failures while computing (a job's `error`, or a result read)
    "estimator-error": ProblemType(
        (422,),
        "The estimator refused the job's inputs or parameters; `errors` names the parameter to change.",
    ),
    "numerical-instability": ProblemType(
        (422, 500),
        "CG or LiSSA diverged, factors or scores held NaN/inf: `errors` names the parameter to change "
        "(usually damping or the step scale).",
    ),
    "timeout": ProblemType((500,), "The computation ran past the worker's time limit."),
    "resource-limit": ProblemType(
        (500,),
        "The computation ran out of memory or another sandbox limit; lower chunk size, queries or model "
        "size.",
    ),
    "disk-full": ProblemType(
        (507,), "The artifact store or the worker ran out of disk; nothing partial was kept."
    ),
    "worker-lost": ProblemType(
        (500,), "The job's (or a shard's) worker stopped heartbeating on every allowed attempt."
    ),
    "merge-failed": ProblemType((500,), "Merging a sharded job's results failed on every allowed attempt."),
    "invalid-output": ProblemType(
        (500,), "The sandboxed computation returned output that failed validation."
    ),
    "result-missing": ProblemType((500,), "The job is marked succeeded but its result artifact is gone."),
    "group-scores-missing": ProblemType((500,), "The job has groups but no stored scores to group."),
    "internal-error": ProblemType(
        (500,), "An unexpected error; the detail holds the request id for the logs."
    ),
    # --- the service
    "not-ready": ProblemType((503,), "`/readyz`: the database or the broker does not answer."),
    "database-unavailable": ProblemType(
        (503,), "The database is unreachable; retry after `Retry-After` seconds."
    ),
}
"""Every ``code`` the service emits. An HTTP error that no handler names becomes ``http-<status>``."""


@dataclass
class FieldError:
    """One invalid field, located by a JSON pointer into the request."""

    pointer: str
    detail: str


@dataclass
class ProblemError(Exception):
    status: int
    code: str
    title: str
    detail: str = ""
    errors: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.status} {self.code}: {self.detail or self.title}")

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE_URI + self.code

    def to_dict(self, *, instance: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail or self.title,
            "code": self.code,
        }
        if instance is not None:
            body["instance"] = instance
        if request_id is not None:
            body["request_id"] = request_id
        if self.errors:
            body["errors"] = [{"pointer": e.pointer, "detail": e.detail} for e in self.errors]
        return body


def invalid_field(
    pointer: str, detail: str, *, status: int = 422, code: str = "invalid-request"
) -> ProblemError:
    """Shorthand for the common 'this one field is wrong' problem."""
    return ProblemError(
        status=status,
        code=code,
        title="The request is invalid",
        detail=detail,
        errors=[FieldError(pointer, detail)],
    )


def problem_types_markdown() -> str:
    """``docs/problems.md``: the catalogue as a table, grouped by HTTP status."""
    rows = sorted(PROBLEM_TYPES.items(), key=lambda kv: (kv[1].statuses, kv[0]))
    lines = [
        "# Problem types",
        "",
        "Every 4xx/5xx answer and every failed job's `error` is an RFC 9457 problem object whose `type` is",
        f"`{PROBLEM_BASE_URI}<code>` and whose `code` is one of these. Generated from",
        "`app/problems.py` (`python -m app.problems > docs/problems.md`); a test keeps it in step with the",
        "code, and `GET /v1/problem-types` serves the same list as JSON. An HTTP-level error no handler",
        "names is `http-<status>`.",
        "",
        "| code | status | when, and what to do |",
        "| --- | --- | --- |",
    ]
    for code, pt in rows:
        lines.append(f"| `{code}` | {', '.join(map(str, pt.statuses))} | {pt.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(problem_types_markdown(), end="")
