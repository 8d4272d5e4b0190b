from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class RequestModel(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None = Field(
        None, description="Pass as page_token to get the next page; absent at the end."
    )


class FieldProblem(BaseModel):
    pointer: str = Field(description="JSON pointer to the offending field of the request.")
    detail: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable short slug of the problem type.")
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldProblem] | None = None
