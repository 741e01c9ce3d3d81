"""GET /metrics: the frontend's Prometheus metrics (requests, latency, TTFT, tokens, in-flight)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from openai_frontend.state import frontend_state

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(frontend_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
