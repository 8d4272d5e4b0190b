"""API keys: a typed, checksummed token; stored only as a keyed hash; checked in constant time.

Token layout (like GitHub's): ``iak_<key_id>_<secret><crc>``. ``key_id`` is a
public, indexed handle, so verifying a key is one primary-key-like lookup plus
one HMAC; the CRC lets clients and secret scanners reject a mistyped or
truncated token without a round trip. Keys carry 190 bits of randomness, so a
fast keyed hash (HMAC-SHA256 with a server pepper) is enough; no bcrypt.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import string
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from hashlib import sha256
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Tenant
from app.problems import ProblemError
from app.schemas.tenants import EffectiveLimits
from app.services.tenants import effective_limits
from app.settings import Settings

PREFIX = "iak_"
SCOPES = ("read", "write", "admin")
_ALPHABET = string.digits + string.ascii_letters
_KEY_ID_LEN, _SECRET_LEN, _CRC_LEN = 12, 32, 6
_TOKEN = re.compile(rf"^{PREFIX}([0-9A-Za-z]{{{_KEY_ID_LEN}}})_([0-9A-Za-z]{{{_SECRET_LEN + _CRC_LEN}}})$")
_TOUCH_EVERY = timedelta(seconds=60)  # last_used_at precision: avoids a write on every request


@dataclass(frozen=True)
class Principal:
    """Who is calling: everything a route needs to scope and limit the request."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]
    limits: EffectiveLimits
    expires_at: datetime | None = None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def seconds_to_expiry(self) -> float:
        return float("inf") if self.expires_at is None else (self.expires_at - utcnow()).total_seconds()


def _base62(n_chars: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n_chars))


def _crc(body: str) -> str:
    value, out = zlib.crc32(body.encode()), []
    for _ in range(_CRC_LEN):
        value, digit = divmod(value, 62)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def new_token() -> tuple[str, str]:
    """(token, key_id) for a fresh key."""
    key_id = _base62(_KEY_ID_LEN)
    body = f"{PREFIX}{key_id}_{_base62(_SECRET_LEN)}"
    return body + _crc(body), key_id


def parse(token: str) -> str | None:
    """The key_id of a well-formed token with a valid checksum, else None."""
    match = _TOKEN.match(token)
    if match is None or _crc(token[:-_CRC_LEN]) != token[-_CRC_LEN:]:
        return None
    return match.group(1)


class MissingPepper(RuntimeError):
    """A shared database without ``IA_API_KEY_PEPPER``: each host would key hashes differently."""


def pepper(settings: Settings) -> bytes:
    """The HMAC key: ``IA_API_KEY_PEPPER``; embedded mode only, a random one kept in data_dir.

    A server on an external database must be given the secret: a generated one would differ on every
    host behind the same database, and keys issued on one would fail on the others.
    """
    if settings.api_key_pepper is not None:
        return settings.api_key_pepper.get_secret_value().encode()
    if not settings.embedded:
        raise MissingPepper(
            "IA_API_KEY_PEPPER is required with IA_DATABASE_URL: set the same random secret "
            "(e.g. `openssl rand -hex 32`) on every API process and on `influence keys`"
        )
    return _file_pepper(settings.data_dir.resolve() / "api-key-pepper")


@lru_cache
def _file_pepper(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def hash_token(settings: Settings, token: str) -> str:
    return hmac.new(pepper(settings), token.encode(), sha256).hexdigest()


def _unauthorized(code: str, detail: str) -> ProblemError:
    return ProblemError(401, code, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def authenticate(session: Session, settings: Settings, token: str | None) -> Principal:
    """The principal of a presented token, or 401: missing, malformed, unknown, revoked or expired."""
    if not token:
        raise _unauthorized(
            "unauthenticated", "send an API key as 'Authorization: Bearer iak_...' or 'X-API-Key: iak_...'"
        )
    key_id = parse(token)
    row = (
        session.execute(
            select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id).where(ApiKey.key_id == key_id)
        ).first()
        if key_id
        else None
    )
    expected = row.ApiKey.secret_hash if row else hash_token(settings, "")  # same work when unknown
    if not hmac.compare_digest(expected, hash_token(settings, token)) or row is None:
        raise _unauthorized("invalid-api-key", "the API key is not valid")
    key, tenant = row.ApiKey, row.Tenant
    now = utcnow()
    if key.revoked_at is not None:
        raise _unauthorized("api-key-revoked", f"API key {key.key_id} was revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise _unauthorized(
            "api-key-expired", f"API key {key.key_id} expired at {key.expires_at.isoformat()}"
        )
    if tenant.disabled_at is not None:
        raise ProblemError(403, "tenant-disabled", "Forbidden", f"tenant {tenant.name} is disabled")
    if key.last_used_at is None or now - key.last_used_at > _TOUCH_EVERY:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    limits = effective_limits(settings, tenant)
    return Principal(tenant.id, key.key_id, frozenset(key.scopes), limits, key.expires_at)


def create(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    *,
    name: str,
    scopes: list[str],
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Mint a key; the token is returned once and never stored."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; choose from {SCOPES}")
    token, key_id = new_token()
    key = ApiKey(
        tenant_id=tenant.id,
        key_id=key_id,
        secret_hash=hash_token(settings, token),
        name=name,
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, token


def get(session: Session, tenant_id: str, key_id: str) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id, ApiKey.tenant_id == tenant_id))
    if key is None:
        raise ProblemError(404, "not-found", "API key not found", f"no API key {key_id}")
    return key


def list_for(session: Session, tenant_id: str) -> list[ApiKey]:
    return list(
        session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at))
    )


def revoke(session: Session, key: ApiKey) -> ApiKey:
    """Idempotent; takes effect on the next request that presents the key."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def admin_key_file(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "admin-api-key"


def ensure_local_admin(session: Session, settings: Settings) -> str | None:
    """First start of a deployment without keys: a ``local`` tenant and an admin key, saved 0600.

    Returns the new token (to print once), or None when keys already exist.
    """
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        return None
    tenant = session.scalar(select(Tenant).where(Tenant.name == "local")) or Tenant(name="local", limits={})
    session.add(tenant)
    session.flush()
    _key, token = create(session, settings, tenant, name="local admin", scopes=list(SCOPES))
    path = admin_key_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token
