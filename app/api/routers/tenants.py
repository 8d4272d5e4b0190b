"""Tenants and API keys (admin scope), and ``/v1/me`` for any valid key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.auth import AdminAccess, ReadAccess
from app.api.deps import DEFAULT_PAGE, CommittingRoute, PageSize, PageToken, SessionDep, SettingsDep
from app.api.openapi import GATE, problems
from app.db.models import ApiKey, Tenant
from app.schemas.common import Page
from app.schemas.tenants import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    TenantCreate,
    TenantLimits,
    TenantRead,
    TenantUpdate,
    WhoAmI,
)
from app.services import api_keys, tenants
from app.settings import Settings

router = APIRouter(tags=["tenants"], responses=GATE, route_class=CommittingRoute)


def tenant_read(settings: Settings, tenant: Tenant) -> TenantRead:
    return TenantRead(
        id=tenant.id,
        name=tenant.name,
        limits=TenantLimits.model_validate(tenant.limits or {}),
        effective_limits=tenants.effective_limits(settings, tenant),
        created_at=tenant.created_at,
    )


def key_read(key: ApiKey) -> ApiKeyRead:
    return ApiKeyRead.model_validate(key)


@router.get("/v1/me", response_model=WhoAmI, summary="The calling key, its tenant, limits and usage")
def who_am_i(caller: ReadAccess, session: SessionDep, settings: SettingsDep):
    tenant = tenants.get(session, caller.tenant_id)
    return WhoAmI(
        tenant=tenant_read(settings, tenant),
        key_id=caller.key_id,
        scopes=sorted(caller.scopes),
        storage_bytes_used=tenants.storage_used(session, tenant.id),
        active_jobs=tenants.active_jobs(session, tenant.id),
        compute_seconds_last_24h=round(tenants.compute_seconds_used(session, tenant.id), 3),
    )


@router.post(
    "/v1/tenants",
    status_code=201,
    response_model=TenantRead,
    responses=problems(400, 409, 413),
    summary="Create a tenant",
)
def create_tenant(
    admin: AdminAccess,
    body: TenantCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
):
    tenant = tenants.create(session, body)
    response.headers["Location"] = str(request.url_for("get_tenant", tenant_id=tenant.id))
    return tenant_read(settings, tenant)


@router.get("/v1/tenants", response_model=Page[TenantRead])
def list_tenants(
    admin: AdminAccess,
    session: SessionDep,
    settings: SettingsDep,
    page_size: PageSize = DEFAULT_PAGE,
    page_token: PageToken = None,
):
    rows, token = tenants.list_page(session, page_size, page_token)
    return Page[TenantRead](items=[tenant_read(settings, t) for t in rows], next_page_token=token)


@router.get("/v1/tenants/{tenant_id}", response_model=TenantRead, responses=problems(404))
def get_tenant(admin: AdminAccess, tenant_id: str, session: SessionDep, settings: SettingsDep):
    return tenant_read(settings, tenants.get(session, tenant_id))


@router.patch(
    "/v1/tenants/{tenant_id}",
    response_model=TenantRead,
    responses=problems(400, 404, 413),
    summary="Replace a tenant's limits",
)
def update_tenant(
    admin: AdminAccess, tenant_id: str, body: TenantUpdate, session: SessionDep, settings: SettingsDep
):
    return tenant_read(settings, tenants.set_limits(session, tenants.get(session, tenant_id), body.limits))


@router.post(
    "/v1/tenants/{tenant_id}/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=problems(400, 404, 413),
    summary="Mint an API key (the secret is shown once)",
)
def create_api_key(
    admin: AdminAccess, tenant_id: str, body: ApiKeyCreate, session: SessionDep, settings: SettingsDep
):
    tenant = tenants.get(session, tenant_id)
    key, token = api_keys.create(
        session, settings, tenant, name=body.name, scopes=list(body.scopes), expires_at=body.expires_at
    )
    return ApiKeyCreated(**key_read(key).model_dump(), key=token)


@router.get("/v1/tenants/{tenant_id}/api-keys", response_model=list[ApiKeyRead], responses=problems(404))
def list_api_keys(admin: AdminAccess, tenant_id: str, session: SessionDep):
    tenant = tenants.get(session, tenant_id)
    return [key_read(k) for k in api_keys.list_for(session, tenant.id)]


@router.delete(
    "/v1/tenants/{tenant_id}/api-keys/{key_id}",
    status_code=204,
    responses=problems(404),
    summary="Revoke an API key",
)
def revoke_api_key(
    admin: AdminAccess, tenant_id: str, key_id: str, request: Request, session: SessionDep
) -> Response:
    """Immediate on this API process; other processes stop trusting the key within IA_AUTH_CACHE_SECONDS."""
    api_keys.revoke(session, api_keys.get(session, tenant_id, key_id))
    session.commit()
    request.app.state.principal_cache.forget(key_id)
    return Response(status_code=204)
