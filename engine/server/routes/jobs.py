"""``POST /v1/jobs``, ``GET /v1/jobs/{job_id}``, ``DELETE /v1/jobs/{job_id}`` over the job queue.

The body is read raw and parsed by :func:`engine.payloads.parse_payload`, so a
malformed job is the engine's own typed error (422 naming the field); its
OpenAPI schema is the payload union's (:func:`engine.payloads.payload_json_schema`).
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from engine.jobs import JobResult
from engine.payloads import payload_json_schema
from engine.server.auth import Authorized
from engine.server.schemas import CancelView, JobAccepted, JobView, error_responses
from engine.server.service import Service

router = APIRouter(dependencies=Authorized, tags=["jobs"])

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
def get_job(job_id: str, service: Service) -> JobView:
    """State and (once finished) result of an accepted job."""
    return JobView.of(service.queue.record(job_id))


@router.delete("/v1/jobs/{job_id}", response_model=CancelView, status_code=202,
               responses=error_responses(404, 409))
def cancel_job(job_id: str, service: Service) -> CancelView:
    """Cancel a job: a queued one is dropped, a running one stops at its next token."""
    return CancelView(job_id=job_id, state=service.queue.cancel(job_id))
