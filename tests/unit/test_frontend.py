"""The OpenAI frontend's routers on the FakeEngine, in-process (Starlette TestClient / httpx ASGI transport)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from openai_frontend import Settings, create_app
from openai_frontend.engine.base import EngineError, EngineUnavailable, SamplingOptions
from openai_frontend.engine.fake import IMAGE_TOKENS, FakeEngine

MODEL = "fake-vlm"
HELLO = [{"role": "user", "content": "hello big world"}]


def client_for(engine: FakeEngine | None = None, **settings: Any) -> TestClient:
    return TestClient(create_app(engine or FakeEngine(MODEL), Settings(**settings)))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(MODEL)


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with client_for(engine) as c:
        yield c


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    assert text.endswith("\n\n")
    return [block.removeprefix("data: ") for block in text.strip().split("\n\n")]


def assert_openai_error(response: Any, status: int, *, type: str | None = None) -> dict[str, Any]:
    """Checks an OpenAI error body (httpx or the TestClient's httpx2 response) and returns its `error`."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if type is not None:
        assert error["type"] == type
    return error


# --- chat -------------------------------------------------------------------------------------------------------
def test_chat_non_streaming(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    body = r.json()
    assert r.status_code == 200
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello big world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_streaming_chunks_and_usage(client: TestClient) -> None:
    plain = client.post("/v1/chat/completions", json={"messages": HELLO}).json()
    r = client.post(
        "/v1/chat/completions",
        json={"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_streaming_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    events = sse_events(client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True}).text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_chat_request_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": None},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
                {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
                {"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
            ],
        },
    ]
    body = {
        "messages": messages,
        "max_tokens": 100,
        "max_completion_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": -1,
        "seed": 7,
        "stop": "###",
        "presence_penalty": 0.1,
        "frequency_penalty": -0.1,
        "repetition_penalty": 1.2,
        "ignore_eos": False,
        "user": "u1",
        "n": 1,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"  # max_completion_tokens wins over max_tokens
    assert r.json()["usage"]["prompt_tokens"] == 5 + 3 * IMAGE_TOKENS
    sent = engine.requests[-1]
    assert sent.stream is False
    assert sent.sampling == SamplingOptions(
        max_tokens=2,
        temperature=0.5,
        top_p=0.9,
        top_k=0,
        seed=7,
        repetition_penalty=1.2,
        presence_penalty=0.1,
        frequency_penalty=-0.1,
        stop=("###",),
        ignore_eos=False,
    )
    parts = sent.messages[2]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}}
    assert parts[2] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert parts[3] == {"type": "video_url", "video_url": {"url": "file:///v.mp4"}}
    assert sent.messages[1] == {"role": "assistant"}


def test_stop_list_and_unset_options(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "stop": ["big", "zzz"]})
    assert r.json()["choices"][0]["message"]["content"] == "echo: hello"
    assert engine.requests[-1].sampling == SamplingOptions(stop=("big", "zzz"))


def test_unknown_fields_are_accepted_and_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    body = {"messages": [{"role": "user", "content": "hi", "name": "bob"}], "logit_bias": {}, "tools": []}
    with caplog.at_level(logging.INFO, logger="openai_frontend"):
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert "ignoring unsupported fields: logit_bias, tools, messages[0].name" in caplog.text


# --- completions ------------------------------------------------------------------------------------------------
def test_completions_send_the_prompt_as_one_user_message(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["tell a joke"], "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "echo: tell a", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert engine.requests[-1].messages == ({"role": "user", "content": "tell a joke"},)


def test_completions_streaming(client: TestClient) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": "a b", "stream": True, "stream_options": {"include_usage": True}}
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "echo: a b"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_completions_reject_several_prompts(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400)
    assert "exactly one prompt" in error["message"]


# --- models, health, metrics ------------------------------------------------------------------------------------
def test_models(client: TestClient) -> None:
    listed = client.get("/v1/models").json()
    assert listed == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "fake"}],
    }
    assert client.get(f"/v1/models/{MODEL}").json() == listed["data"][0]


def test_models_with_a_slash_in_the_id() -> None:
    with client_for(FakeEngine("OpenGVLab/InternVL2-2B")) as c:
        assert c.get("/v1/models/OpenGVLab/InternVL2-2B").json()["id"] == "OpenGVLab/InternVL2-2B"


def test_unknown_model_is_404(client: TestClient) -> None:
    error = assert_openai_error(client.get("/v1/models/nope"), 404)
    assert error["code"] == "model_not_found" and MODEL in error["message"]
    error = assert_openai_error(client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": HELLO}), 404)
    assert error["param"] == "model"
    assert_openai_error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)


def test_unknown_route_and_method_have_openai_errors(client: TestClient) -> None:
    assert "no route GET /v1/nothing" in assert_openai_error(client.get("/v1/nothing"), 404)["message"]
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_health_and_readiness(engine: FakeEngine, client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ready"}
    engine.is_ready = False
    assert_openai_error(client.get("/health/ready"), 503)
    assert client.get("/health").status_code == 200


def test_metrics(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"messages": HELLO})
    client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
    client.post("/v1/chat/completions", json={"messages": []})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'vlm_frontend_requests_total{endpoint="chat",status="200"} 2.0' in text
    assert 'vlm_frontend_requests_total{endpoint="chat",status="400"} 1.0' in text
    assert 'vlm_frontend_prompt_tokens_total{endpoint="chat"} 6.0' in text
    assert 'vlm_frontend_completion_tokens_total{endpoint="chat"} 8.0' in text
    assert 'vlm_frontend_time_to_first_token_seconds_count{endpoint="chat"} 1.0' in text
    assert 'vlm_frontend_request_duration_seconds_count{endpoint="chat"} 3.0' in text
    assert "vlm_frontend_inflight_requests 0.0" in text


def test_engine_is_closed_on_shutdown(engine: FakeEngine) -> None:
    with client_for(engine):
        assert not engine.closed
    assert engine.closed


# --- client errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"messages": [', "not valid JSON"),
        ("", "body is missing"),
        ("[1, 2]", "must be a JSON object"),
        ('{"messages": "hi"}', "messages: Input should be a valid list"),
        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "x"}], "stream": [1]}', "stream"),
        ('{"messages": [{"role": "user", "content": 7}]}', "messages[0].content"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].role: Input should be 'system', 'user'"),
        ('{"messages": []}', "messages: List should have at least 1 item"),
        ('{"messages": [{"role": "user"}]}', "a user message needs 'content'"),
        ('{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}', "messages[0].content[0]"),
        ('{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "messages[0].content[0].text: Field"),
        (
            '{"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "http://x"}]}]}',
            "only accepted in user messages",
        ),
        ('{"messages": [{"role": "user", "content": "x"}], "n": 2}', "n=2 is not supported"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": 5}', "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "stop": [""]}', "stop strings must not be empty"),
    ],
)
def test_bad_requests_are_400(client: TestClient, body: str, expected: str) -> None:
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, type="invalid_request_error")
    assert expected in error["message"]


def test_form_encoded_body_is_explained(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=json.dumps({"messages": HELLO}))  # no JSON content type
    assert "Content-Type: application/json" in assert_openai_error(r, 400)["message"]


def test_invalid_input_from_the_engine_is_passed_through(client: TestClient) -> None:
    content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "bad://img"}}]
    for stream in (False, True):
        r = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "stream": stream}
        )
        error = assert_openai_error(r, 400, type="invalid_request_error")
        assert error["message"].startswith("could not load image 'bad://img'")


@pytest.mark.parametrize(("error", "status"), [(EngineUnavailable("Triton is down"), 503), (EngineError("boom"), 500)])
def test_engine_failures_map_to_status(error: EngineError, status: int) -> None:
    with client_for(FakeEngine(MODEL, error=error)) as c:
        r = c.post("/v1/chat/completions", json={"messages": HELLO})
        assert assert_openai_error(r, status, type="server_error")["message"] == str(error)
        assert ("retry-after" in r.headers) == (status == 503)


def test_error_mid_stream_is_sent_in_band(client: TestClient) -> None:
    with client_for(FakeEngine(MODEL, fail_after=2, error=EngineError("decoder crashed"))) as c:
        r = c.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {
        "error": {"message": "decoder crashed", "type": "server_error", "param": None, "code": "engine_error"}
    }


# --- protection: API key, body size, in-flight limit, CORS ------------------------------------------------------
def test_api_key() -> None:
    with client_for(api_key="s3cret") as c:
        assert assert_openai_error(c.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(c.post("/v1/chat/completions", json={"messages": HELLO}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": HELLO}, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # not under /v1


def test_body_size_limit() -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    with client_for(max_body_bytes=4096) as c:
        error = assert_openai_error(c.post("/v1/chat/completions", json=big), 413)
        assert "4096 bytes" in error["message"]

        def chunks() -> Iterator[bytes]:  # chunked upload: no Content-Length
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 1000):
                yield payload[i : i + 1000]

        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "4096 bytes" in assert_openai_error(r, 413)["message"]
        assert c.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200


def test_inflight_limit_returns_429_with_retry_after() -> None:
    engine = FakeEngine(MODEL, delay_s=0.05)
    app = create_app(engine, Settings(max_inflight=1, retry_after_s=3))

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json={"messages": HELLO}))
            while not engine.started.is_set():
                await asyncio.sleep(0.005)
            rejected = await client.post("/v1/completions", json={"prompt": "x"})
            models = await client.get("/v1/models")  # not a generation route: never limited
            assert models.status_code == 200
            return await first, rejected, await client.post("/v1/chat/completions", json={"messages": HELLO})

    first, rejected, after = asyncio.run(scenario())
    assert first.status_code == 200 and after.status_code == 200
    error = assert_openai_error(rejected, 429, type="rate_limit_error")
    assert rejected.headers["retry-after"] == "3" and "limit of 1" in error["message"]


def test_cors() -> None:
    with client_for(api_key="k", cors_origins=("https://app.example",)) as c:
        preflight = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        denied = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with client_for() as c:
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://a.b"}).headers


def test_null_options_mean_defaults(client: TestClient, engine: FakeEngine) -> None:
    body = {"messages": HELLO, "stream": None, "temperature": None, "stop": None, "n": None, "stream_options": None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert engine.requests[-1].sampling == SamplingOptions() and engine.requests[-1].stream is False
