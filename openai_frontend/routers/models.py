"""GET /v1/models and GET /v1/models/{id} (ids may contain '/', e.g. OpenGVLab/InternVL2-2B)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from openai_frontend.engine.base import ModelInfo
from openai_frontend.protocol import ModelCard, ModelList
from openai_frontend.state import frontend_state

router = APIRouter(tags=["models"])


def _card(info: ModelInfo) -> ModelCard:
    return ModelCard(id=info.id, created=info.created, owned_by=info.owned_by)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(m) for m in frontend_state(request).engine.models()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = frontend_state(request)
    served = state.resolve_model(model_id)  # 404 with the served names when unknown
    return next(_card(m) for m in state.engine.models() if m.id == served)
