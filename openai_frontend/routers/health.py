"""GET /health (the process is up) and GET /health/ready (Triton and the models can serve a request)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from openai_frontend.errors import error_response
from openai_frontend.state import frontend_state

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    if await frontend_state(request).engine.ready():
        return JSONResponse({"status": "ready"})
    return error_response("not ready: Triton or the served models are not ready yet", 503, code="not_ready")
