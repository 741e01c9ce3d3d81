"""Prometheus metrics of the frontend, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vlm_frontend_requests",
            "Generation requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vlm_frontend_request_duration_seconds",
            "Time from request to the last byte sent",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vlm_frontend_time_to_first_token_seconds",
            "Time from request to the first generated text (streaming requests)",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("vlm_frontend_prompt_tokens", "Prompt tokens processed", ["endpoint"], registry=r)
        self.completion_tokens = Counter(
            "vlm_frontend_completion_tokens", "Completion tokens generated", ["endpoint"], registry=r
        )
        self.inflight = Gauge("vlm_frontend_inflight_requests", "Generation requests being served", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
