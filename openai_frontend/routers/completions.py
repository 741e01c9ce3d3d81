"""POST /v1/completions: a text prompt, streaming or not.

The prompt is sent to the BLS as one user message (`messages=[{"role": "user", "content": prompt}]`), so the
model's chat template is applied: this is "complete this user turn", not raw continuation of the text.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from openai_frontend.generation import Generation
from openai_frontend.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from openai_frontend.sse import CompletionChunkEncoder, EventStreamResponse
from openai_frontend.state import frontend_state, log_ignored

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = frontend_state(request)
    model = state.resolve_model(body.model)
    log_ignored(body, "completions")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    generation = await Generation.start(request, state, body.generation_request(request_id), "completions")
    if body.stream:
        encoder = CompletionChunkEncoder(request_id, created, model, include_usage=body.include_usage)
        return EventStreamResponse(generation.sse(encoder))
    text = await generation.collect()
    response = CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[CompletionChoice(text=text, finish_reason=generation.finish_reason or "stop")],
        usage=generation.usage(),
    )
    return JSONResponse(response.model_dump(mode="json"))
