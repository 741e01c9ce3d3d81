"""The FastAPI app: routers, OpenAI error handlers and the guard/CORS middleware around them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from openai_frontend.engine.base import Engine
from openai_frontend.errors import install_error_handlers
from openai_frontend.inflight import InflightLimit
from openai_frontend.loop_lag import loop_lag_probe
from openai_frontend.metrics import Metrics
from openai_frontend.middleware import FrontendGuard
from openai_frontend.routers import ROUTERS
from openai_frontend.settings import Settings
from openai_frontend.state import FrontendState


def create_app(engine: Engine, settings: Settings | None = None, shared_inflight: Any = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine`; the engine is closed when the app shuts down. `shared_inflight`: the
    in-flight counter of a server's workers (openai_frontend/workers.py); None counts this app's requests only."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with loop_lag_probe():  # VLM_TRITON_STEP_STATS only
            yield
        await engine.close()

    app = FastAPI(title="vlm-triton OpenAI frontend", version="0.1.0", lifespan=lifespan)
    app.state.frontend = FrontendState(engine=engine, settings=settings, metrics=metrics)
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    # add_middleware puts the last one outermost: CORS answers preflights and decorates the guard's 401/429/413
    app.add_middleware(FrontendGuard, settings=settings, metrics=metrics,
                       inflight=InflightLimit(settings.max_inflight, shared_inflight))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )
    return app
