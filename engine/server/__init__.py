"""The local HTTP API (``aitbc-engine serve``): the engine for miner software in any language.

A small FastAPI app, thin over the library: every route calls the same
:class:`~engine.executor.Engine`, job queue (:mod:`engine.jobqueue`), payload
schema (:mod:`engine.payloads`) and inventory (:mod:`engine.inventory`) as the
command line, so a job posted here gets the same result and ``result_hash`` as
``aitbc-engine run`` and ``Engine.run``.

Routes (every one but ``/health`` needs ``Authorization: Bearer <token>``):

==========================  ===================================================
``GET /health``             ``{"status": "ok" | "loading" | "error", ...}``
``GET /v1/hardware``        the devices and CPU kernel, as ``aitbc-engine info --json``,
                            and fast-path warm-ups
``GET /v1/models``          the registry, with availability and warm state
``POST /v1/models/{name}/load``  warm a model; ``DELETE /v1/models/{name}`` evicts
``POST /v1/jobs``           run a job (engine JSON or any coordinator payload)
``GET /v1/jobs/{id}``       state and result of an accepted job
``DELETE /v1/jobs/{id}``    cancel it
``POST /v1/estimate``       pricing estimate from a stored profile (``--profile``)
``GET /metrics``            Prometheus text
==========================  ===================================================

Answers to ``POST /v1/jobs``: an input error found before the job runs is a 4xx
(422 malformed, with the field named; 404 unknown model; 409 a job id already
taken or a model this engine's devices cannot hold; 503 with ``Retry-After``
when the queue is full). Once accepted, the job's outcome is a
:class:`~engine.jobs.JobResult`: ``?wait=true`` (the default) answers 200 with
it whether the job completed or failed while running (``status`` says which),
``?wait=false`` answers 202 with the job id at once.

Every error body is ``{"error": {"code", "message", "field"?}}``.

The token is read from (or generated on first start into) ``<state_dir>/token``
with file mode 0600 unless one is given (:mod:`engine.state`). The state
directory defaults to ``$AITBC_ENGINE_STATE`` or else platformdirs'
``user_state_dir("aitbc-engine")`` (``~/.local/state/aitbc-engine`` on Linux).

The package: :mod:`~engine.server.app` wires the app; ``routes/`` holds one
router per concern (meta and hardware, models, jobs, estimate, metrics);
:mod:`~engine.server.service` the per-app service the routes get as a
dependency; :mod:`~engine.server.schemas` the request and response shapes;
:mod:`~engine.server.errors`, :mod:`~engine.server.auth` and
:mod:`~engine.server.middleware` the error answers, the token check and the
body limit; :mod:`~engine.server.serving` runs it with uvicorn.
"""

from engine.jobqueue import DEFAULT_HISTORY, DEFAULT_MAX_QUEUE, JobRecord, JobStore
from engine.server.app import create_app
from engine.server.errors import ServerError, status_for
from engine.server.middleware import DEFAULT_MAX_BODY_BYTES
from engine.server.service import ApiService
from engine.server.serving import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServeOptions,
    build_server,
    is_loopback,
    running_server,
    serve,
)
from engine.state import TokenFileError, default_state_dir, load_or_create_token, mask_secret

__all__ = [
    "DEFAULT_HISTORY",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_PORT",
    "ApiService",
    "JobRecord",
    "JobStore",
    "ServeOptions",
    "ServerError",
    "TokenFileError",
    "build_server",
    "create_app",
    "default_state_dir",
    "is_loopback",
    "load_or_create_token",
    "mask_secret",
    "running_server",
    "serve",
    "status_for",
]
