"""POST /v1/chat/completions: streaming (SSE ending with `data: [DONE]`) and non-streaming chat."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from openai_frontend.generation import Generation
from openai_frontend.protocol import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse
from openai_frontend.sse import ChatChunkEncoder, EventStreamResponse
from openai_frontend.state import frontend_state, log_ignored

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion over the BLS; images/videos travel as content parts of user messages."""
    state = frontend_state(request)
    model = state.resolve_model(body.model)
    log_ignored(body, "chat")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    generation = await Generation.start(request, state, body.generation_request(request_id), "chat")
    if body.stream:
        encoder = ChatChunkEncoder(request_id, created, model, include_usage=body.include_usage)
        return EventStreamResponse(generation.sse(encoder))
    text = await generation.collect()
    response = ChatCompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=generation.finish_reason or "stop")],
        usage=generation.usage(),
    )
    return JSONResponse(response.model_dump(mode="json"))
