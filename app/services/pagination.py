"""Opaque cursor pagination over (created_at, id), newest first."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, or_
from sqlalchemy.orm import Session

from app.problems import invalid_field

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def encode_token(*values: Any) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


MAX_TOKEN_CHARS = 512  # ours hold a timestamp and an id, or a position: under 150 characters


def _not_ours() -> Exception:
    return invalid_field("/page_token", "page_token is not a token this service issued")


def decode_token(token: str, *kinds: type) -> list[Any]:
    """The values of a token from :func:`encode_token`: exactly one per entry of ``kinds``, each of that
    type (``int`` excludes booleans; ``datetime`` is an ISO string with a time zone, returned parsed).
    A token of another listing, or made up, is a 422 naming ``/page_token``, never a 500."""
    if len(token) > MAX_TOKEN_CHARS:
        raise _not_ours()
    try:
        padded = token + "=" * (-len(token) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, RecursionError):  # RecursionError: a made-up token of deeply nested brackets
        raise _not_ours() from None
    if not isinstance(values, list) or len(values) != len(kinds):
        raise _not_ours()
    out: list[Any] = []
    for value, kind in zip(values, kinds, strict=True):
        if kind is datetime:
            try:
                value = datetime.fromisoformat(value)
            except (TypeError, ValueError):
                raise _not_ours() from None
            if value.tzinfo is None:
                raise _not_ours()
        elif kind is int:
            if type(value) is not int or not 0 <= value < 2**63:
                raise _not_ours()
        elif not isinstance(value, kind):
            raise _not_ours()
        out.append(value)
    return out


def paginate(session: Session, stmt: Select, entity: Any, page_size: int, page_token: str | None):
    """Return (rows, next_page_token) for ``stmt`` ordered by (created_at, id) descending."""
    if page_token:
        created_at, row_id = decode_token(page_token, datetime, str)
        stmt = stmt.where(
            or_(entity.created_at < created_at, (entity.created_at == created_at) & (entity.id < row_id))
        )
    stmt = stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(page_size + 1)
    rows = list(session.scalars(stmt))
    next_token = None
    if len(rows) > page_size:
        rows = rows[:page_size]
        next_token = encode_token(rows[-1].created_at, rows[-1].id)
    return rows, next_token
