"""One router per endpoint group; each is HTTP only and talks to the engine through `Generation`."""

from fastapi import APIRouter

from openai_frontend.routers import chat, completions, health, metrics, models

ROUTERS: tuple[APIRouter, ...] = (chat.router, completions.router, models.router, health.router, metrics.router)
