"""OpenAI-compatible HTTP frontend for the vlm-triton BLS model (see README.md in this folder)."""

from openai_frontend.app import create_app
from openai_frontend.settings import Settings

__all__ = ["Settings", "create_app"]
