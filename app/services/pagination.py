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


def decode_token(token: str) -> list[Any]:
    try:
        padded = token + "=" * (-len(token) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list):
            raise ValueError
        return values
    except ValueError:
        raise invalid_field("/page_token", "page_token is not a token this service issued") from None


def paginate(session: Session, stmt: Select, entity: Any, page_size: int, page_token: str | None):
    """Return (rows, next_page_token) for ``stmt`` ordered by (created_at, id) descending."""
    if page_token:
        created, row_id = decode_token(page_token)
        try:
            created_at = datetime.fromisoformat(created)
        except (TypeError, ValueError):
            raise invalid_field("/page_token", "page_token is not a token this service issued") from None
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
