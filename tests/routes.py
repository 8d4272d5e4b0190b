"""The app's route table, for tests that must cover every route (auth inventory, cross-tenant)."""

from __future__ import annotations

from fastapi.routing import APIRoute


def api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, also inside routers that newer FastAPI includes lazily (we include without prefix)."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found += api_routes(route.original_router.routes)
    return found
