"""Pure-torch LLM engine (no Triton imports): pooled KV cache, continuous batching, per-request sampling.

The Triton `llm` adapter drives `LLMEngine` with `GenerationRequest`s and forwards its `TokenEvent`s.
"""

from vlm_triton.engine.engine import EventCallback, LLMEngine
from vlm_triton.engine.kv_cache import PooledKVCache
from vlm_triton.engine.sampling import SamplingParams, sample_tokens
from vlm_triton.engine.types import FinishReason, GenerationRequest, TokenEvent, parse_stop_words_list

__all__ = [
    "EventCallback",
    "FinishReason",
    "GenerationRequest",
    "LLMEngine",
    "PooledKVCache",
    "SamplingParams",
    "TokenEvent",
    "parse_stop_words_list",
    "sample_tokens",
]
