"""``POST /v1/estimate``: time, GPU seconds and price of a job shape from the stored profile."""

from __future__ import annotations

from fastapi import APIRouter

from engine import pricing
from engine.errors import EngineError
from engine.server.auth import Authorized
from engine.server.errors import ServerError
from engine.server.middleware import SafeJsonRoute
from engine.server.schemas import EstimateRequest, EstimateView, error_responses
from engine.server.service import ApiService, Service

router = APIRouter(route_class=SafeJsonRoute, dependencies=Authorized,
                   tags=["pricing"])


@router.post("/v1/estimate", response_model=EstimateView, responses=error_responses(409))
def estimate(request: EstimateRequest, service: Service) -> EstimateView:
    """Estimated time, GPU seconds and price of a job shape, from the stored profile.

    ``warnings`` names each way the configuration this server runs the profile's model
    in differs from the one the profile was measured in (as ``aitbc-engine price``).
    A shape the model cannot run (``max_tokens`` not below its context length, or
    ``prompt_tokens`` plus ``max_tokens`` over it) is refused with 422, as the job would be."""
    profile = service.profile
    if profile is None:
        raise ServerError(409, "no_profile", "no benchmark profile is loaded; start the server "
                          "with --profile DIR/report.json (from aitbc-engine bench)")
    if request.model is not None and request.model != profile.model:
        raise ServerError(422, "validation_error", f"the profile is for model "
                          f"{profile.model!r}, not {request.model!r}", field="model")
    _check_context(service, profile.model, request)
    run_config, problems = service.profile_run_config()
    result = pricing.estimate(profile, prompt_tokens=request.prompt_tokens,
                              max_tokens=request.max_tokens,
                              price_per_hour=request.price_per_hour,
                              gpu_count=request.gpu_count, run_config=run_config)
    if problems:
        result = result.model_copy(update={"warnings": [*problems, *result.warnings]})
    return EstimateView(profile=str(service.profile_path), estimate=result)


def _check_context(service: ApiService, model: str, request: EstimateRequest) -> None:
    """422 for a shape over ``model``'s context length (the engine's rule for a job); no
    check when the registry does not hold the model."""
    try:
        limit = service.engine.registry.get(model).context_length
    except EngineError:
        return
    if request.max_tokens >= limit:
        raise ServerError(422, "context_length_exceeded", f"max_tokens {request.max_tokens} is "
                          f"not below {model}'s context length of {limit} tokens",
                          field="max_tokens")
    if request.prompt_tokens + request.max_tokens > limit:
        raise ServerError(422, "context_length_exceeded", f"prompt_tokens "
                          f"({request.prompt_tokens}) plus max_tokens ({request.max_tokens}) "
                          f"exceeds {model}'s context length of {limit} tokens; such a job "
                          "would be refused", field="prompt_tokens")
