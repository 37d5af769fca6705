"""``GET /metrics``: Prometheus text."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.server.auth import Authorized
from engine.server.middleware import SafeJsonRoute
from engine.server.schemas import error_responses
from engine.server.service import Service

router = APIRouter(route_class=SafeJsonRoute, dependencies=Authorized, tags=["meta"])


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}, **error_responses()})
def metrics(service: Service) -> Response:
    """Prometheus metrics: jobs by state, durations, GPU seconds, energy, tokens, models."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
