"""``POST /v1/jobs``, ``GET /v1/jobs/{job_id}``, ``DELETE /v1/jobs/{job_id}`` over the job queue.

The body is read raw and parsed by :func:`engine.payloads.parse_payload`, so a
malformed job is the engine's own typed error (422 naming the field); its
OpenAPI schema is the payload union's (:func:`engine.payloads.payload_json_schema`).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from engine.jobs import JOB_ID_PATTERN, JobResult
from engine.payloads import payload_json_schema
from engine.server.auth import Authorized
from engine.server.middleware import SafeJsonRoute
from engine.server.schemas import CancelView, JobAccepted, JobView, error_responses
from engine.server.service import Service

router = APIRouter(route_class=SafeJsonRoute, dependencies=Authorized, tags=["jobs"])

_JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job's id: 1 to 128 "
                                 "characters of A-Z a-z 0-9 . _ : -, the first a letter or digit")]

_BODY = {"required": True, "content": {"application/json": {"schema": payload_json_schema()[0]}}}


@router.post("/v1/jobs", openapi_extra={"requestBody": _BODY},
             responses={200: {"model": JobResult,
                              "description": "the job's result (completed or failed)"},
                        202: {"model": JobAccepted, "description": "accepted (wait=false)"},
                        **error_responses(404, 409, 503)})
async def post_job(request: Request, service: Service, wait: bool = Query(
        True, description="answer with the result (true) or at once with 202 (false)")
) -> Response:
    """Run a job given as engine JSON or any coordinator payload shape."""
    record = service.queue.submit(await request.body())
    if not wait:
        url = f"/v1/jobs/{quote(record.job.job_id, safe='')}"  # a header is latin-1 only
        accepted = JobAccepted(job_id=record.job.job_id, state=record.state, url=url)
        return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": url})
    return JSONResponse((await record.outcome()).to_dict())


@router.get("/v1/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True,
            responses=error_responses(404))
def get_job(job_id: _JobIdPath, service: Service) -> JobView:
    """State and (once finished) result of an accepted job."""
    return JobView.of(service.queue.record(job_id))


@router.delete("/v1/jobs/{job_id}", response_model=CancelView, status_code=202,
               responses=error_responses(404, 409))
def cancel_job(job_id: _JobIdPath, service: Service) -> CancelView:
    """Cancel a job: a queued one is dropped, a running one stops at its next token."""
    return CancelView(job_id=job_id, state=service.queue.cancel(job_id))
