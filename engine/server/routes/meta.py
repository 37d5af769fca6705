"""``GET /health`` (no token), ``GET /v1/hardware`` and the token-protected ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from engine.inventory import hardware_document
from engine.server.auth import Authorized
from engine.server.middleware import SafeJsonRoute
from engine.server.schemas import Health, error_responses
from engine.server.service import Service

router = APIRouter(route_class=SafeJsonRoute)


@router.get("/health", response_model=Health, tags=["meta"])
def health(service: Service) -> Health:
    """Liveness without auth: ``ok``, ``loading`` (preloading models) or ``error``."""
    return service.health()


@router.get("/openapi.json", include_in_schema=False, dependencies=Authorized)
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@router.get("/v1/hardware", dependencies=Authorized, tags=["engine"],
            responses=error_responses())
def get_hardware(service: Service) -> dict[str, Any]:
    """The devices, drivers and versions and the CPU kernel (as ``aitbc-engine info --json``),
    and the fast path's captured decode steps with their warm-up seconds."""
    return hardware_document(service.engine)
