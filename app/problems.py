"""RFC 9457 problem details as a plain exception, raisable from any layer.

The API renders :class:`ProblemError` as ``application/problem+json``; jobs
store :meth:`ProblemError.to_dict` in their ``error`` field. No web imports, so
storage, services and the worker can raise it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROBLEM_BASE_URI = "https://influence-service.dev/problems/"


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
