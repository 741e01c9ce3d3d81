"""What the routers share: the engine, the settings and the metrics of one app."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel

from openai_frontend.engine.base import Engine
from openai_frontend.errors import ModelNotFound
from openai_frontend.metrics import Metrics
from openai_frontend.protocol import ignored_fields
from openai_frontend.settings import Settings

logger = logging.getLogger("openai_frontend")


@dataclass(frozen=True)
class FrontendState:
    engine: Engine
    settings: Settings
    metrics: Metrics

    def resolve_model(self, requested: str | None) -> str:
        """The served model id for a request's `model` (the first served model when none is given)."""
        served = [m.id for m in self.engine.models()]
        if requested is None:
            return served[0]
        if requested not in served:
            raise ModelNotFound(
                f"model {requested!r} does not exist; this server serves: {', '.join(served)}", param="model"
            )
        return requested


def frontend_state(request: Request) -> FrontendState:
    state: FrontendState = request.app.state.frontend
    return state


def log_ignored(body: BaseModel, endpoint: str) -> None:
    names = ignored_fields(body)
    if names:
        logger.info("%s: ignoring unsupported fields: %s", endpoint, ", ".join(names))
