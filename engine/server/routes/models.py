"""``GET /v1/models`` (also OpenAI's list: ``object``, ``data``), ``POST
/v1/models/{name}/load``, ``DELETE /v1/models/{name}``."""

from __future__ import annotations

from fastapi import APIRouter

from engine.errors import EngineError
from engine.inventory import model_views
from engine.server.auth import Authorized
from engine.server.middleware import SafeJsonRoute
from engine.server.schemas import EvictView, LoadView, ModelList, OpenAIModel, error_responses
from engine.server.service import Service

router = APIRouter(route_class=SafeJsonRoute, dependencies=Authorized, tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=error_responses())
def list_models(service: Service) -> ModelList:
    """The registry: each model's availability here and whether it is warm; ``data`` lists
    the runnable models and their aliases as OpenAI's ``GET /v1/models`` does."""
    engine = service.engine
    path = engine.registry.path
    views = model_views(engine.registry, engine.pool, weights=engine.weights)
    names = [v.name for v in views if v.runnable]
    names += [alias for alias, name in engine.registry.aliases().items() if name in names]
    return ModelList(registry=str(path) if path else None, weights=engine.weights,
                     models=views, data=[OpenAIModel(id=name) for name in names])


@router.post("/v1/models/{name}/load", response_model=LoadView,
             responses=error_responses(404, 409))
def load_model(name: str, service: Service) -> LoadView:
    """Warm a model (load it onto the first device that can hold it)."""
    engine = service.engine
    engine.registry.get(name)
    was_warm = engine.pool.is_warm(name)
    loaded = engine.load(name)
    return LoadView(model=name, was_warm=was_warm, devices=[d.id for d in loaded.devices],
                    dtype=loaded.dtype_name, weights=loaded.weights,
                    weights_digest=loaded.weights_digest, memory_bytes=loaded.memory_bytes,
                    load_time_seconds=loaded.load_time_seconds)


@router.delete("/v1/models/{name}", response_model=EvictView,
               responses=error_responses(404, 409))
def evict_model(name: str, service: Service) -> EvictView:
    """Evict a warm model; 409 while a job is using it."""
    engine = service.engine
    engine.registry.get(name)
    evicted = engine.evict(name)
    if not evicted and engine.pool.is_warm(name):
        raise EngineError(f"model {name!r} is running a job; evict it once its jobs are done",
                          field="name", code="model_in_use")
    return EvictView(model=name, evicted=evicted)
