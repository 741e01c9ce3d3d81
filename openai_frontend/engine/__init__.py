"""Engines: the interface (`base`), the Triton gRPC implementation (`triton_grpc`), a fake for tests (`fake`)."""

from openai_frontend.engine.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    ModelInfo,
    SamplingOptions,
)

__all__ = [
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidInput",
    "ModelInfo",
    "SamplingOptions",
]
