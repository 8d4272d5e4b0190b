from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, Strict

T = TypeVar("T")


class RequestModel(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped.

    Strict, so a body means what the OpenAPI document says: ``false`` is not the integer 0, ``0`` is
    not a boolean or the date 1970-01-01, ``"5"`` is not a number.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


def _date_time_text(value: Any) -> Any:
    if not isinstance(value, str | datetime):
        raise ValueError("expected an RFC 3339 date-time string")
    return value


DateTimeText = Annotated[AwareDatetime, Strict(False), BeforeValidator(_date_time_text)]
"""A timezone-aware date-time in a strict request model: RFC 3339 text, never a number of seconds."""


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def next_page_token_field() -> Any:
    """A listing's cursor: present while more items follow, absent (not null) on the last page."""
    return Field(
        None,
        description="Pass as page_token to get the next page; absent at the end.",
        exclude_if=lambda token: token is None,
    )


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None = next_page_token_field()


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


class ProblemTypeRead(ReadModel):
    code: str
    type: str = Field(description="The problem's `type` URI: the base URI followed by the code.")
    statuses: list[int] = Field(description="The HTTP statuses it comes with.")
    description: str = Field(description="When it happens and what to do.")
