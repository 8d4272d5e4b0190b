from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, IdMixin, TimestampMixin


class Tenant(IdMixin, TimestampMixin, Base):
    """A team sharing the deployment: owns datasets, models and jobs; limits override the defaults."""

    __tablename__ = "tenant"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    limits: Mapped[dict] = mapped_column(default=dict)  # TenantLimits fields that differ from Settings
    disabled_at: Mapped[datetime | None] = mapped_column()

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")


class ApiKey(IdMixin, TimestampMixin, Base):
    """An API key, stored only as ``key_id`` (its public handle) and a keyed hash of the whole token."""

    __tablename__ = "api_key"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    scopes: Mapped[list] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")
