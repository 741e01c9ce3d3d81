"""Prometheus metrics of the frontend, one registry per app (so several apps can live in one process).

With `--workers` > 1 the values live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the
supervisor before the workers start, openai_frontend/workers.py), and /metrics on any worker reports the sum over
all of them."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None

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
        self.inflight = Gauge("vlm_frontend_inflight_requests", "Generation requests being served", registry=r,
                              multiprocess_mode="livesum")  # the workers' sum (ignored in one process)

    def render(self) -> bytes:
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()  # every worker's values, read from their files
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
