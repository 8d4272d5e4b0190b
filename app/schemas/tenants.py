from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.schemas.common import DateTimeText, ReadModel, RequestModel

Scope = Literal["read", "write", "admin"]


class TenantLimits(RequestModel):
    """Per-tenant overrides of the deployment's defaults; an absent field keeps the default."""

    max_active_jobs: int | None = Field(None, ge=0, description="Queued plus running jobs (429 beyond).")
    max_running_jobs: int | None = Field(None, ge=1, description="Jobs computing at once; more wait queued.")
    max_storage_bytes: int | None = Field(
        None, ge=0, description="Stored dataset and model bytes, trained weights and checkpoints included."
    )
    read_requests_per_second: int | None = Field(None, ge=1, description="GET/HEAD requests per second.")
    write_requests_per_second: int | None = Field(None, ge=1, description="Other requests per second.")
    max_job_cost: float | None = Field(
        None,
        gt=0,
        description="n_train * n_query * n_parameters * checkpoints cap (plus an LDS evaluation's cost).",
    )
    max_score_cells: float | None = Field(None, gt=0, description="n_train * n_query cap (score matrix).")
    max_compute_seconds_per_day: float | None = Field(
        None, ge=0, description="Running time of jobs and shards in any 24 hours (429 beyond; 0 = no limit)."
    )


class TenantCreate(RequestModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    limits: TenantLimits = Field(default_factory=TenantLimits)


class TenantUpdate(RequestModel):
    limits: TenantLimits


class EffectiveLimits(ReadModel):
    max_active_jobs: int
    max_running_jobs: int
    max_storage_bytes: int
    read_requests_per_second: int
    write_requests_per_second: int
    max_job_cost: float
    max_score_cells: float
    max_compute_seconds_per_day: float


class TenantRead(ReadModel):
    id: str
    name: str
    limits: TenantLimits = Field(description="Overrides set on this tenant.")
    effective_limits: EffectiveLimits = Field(description="What applies: overrides over the defaults.")
    created_at: datetime


class ApiKeyCreate(RequestModel):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[Scope] = Field(
        min_length=1, description="read: GET; write: create, cancel, delete; admin: all."
    )
    expires_at: DateTimeText | None = Field(
        None, description="Timezone-aware; absent means it never expires."
    )


class ApiKeyRead(ReadModel):
    key_id: str = Field(description="The key's public handle (its prefix); never the secret.")
    tenant_id: str
    name: str
    scopes: list[Scope]
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The secret, shown only in this response: store it now.")


class WhoAmI(ReadModel):
    tenant: TenantRead
    key_id: str
    scopes: list[Scope]
    storage_bytes_used: int
    active_jobs: int
    compute_seconds_last_24h: float = Field(
        description="Running time of the tenant's jobs and shards in the last 24 hours (what the daily "
        "compute quota counts)."
    )
