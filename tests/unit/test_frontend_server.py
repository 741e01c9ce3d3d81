"""The frontend on a real uvicorn server (in a thread, on a free port) driven by the official `openai` client.

Also what only a real socket shows: a client that disconnects makes the engine see its request cancelled.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from openai_frontend import Settings, create_app
from openai_frontend.__main__ import parse_args
from openai_frontend.engine.fake import FakeEngine
from openai_frontend.serving import bind, bind_workers, server_implementations
from openai_frontend.workers import METRICS_DIR_PREFIX, metrics_dir_for_this_run, remove_stale_metrics_dirs
from vlm_triton.errors import SetupError

MODEL = "fake-vlm"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello big world"}]


@contextmanager
def serving(engine: FakeEngine, **settings: Any) -> Iterator[str]:
    """Run the app on 127.0.0.1:<free port> in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Settings(port=port, **settings)
    loop, http = server_implementations(config)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="warning", timeout_graceful_shutdown=2,
                                           loop=loop, http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(MODEL)
    with serving(engine, api_key="k1") as url:
        yield url, engine


@pytest.fixture
def sdk(shared: tuple[str, FakeEngine]) -> OpenAI:
    return OpenAI(base_url=f"{shared[0]}/v1", api_key="k1", max_retries=0, timeout=10)


def test_chat_with_the_openai_client(sdk: OpenAI) -> None:
    plain = sdk.chat.completions.create(model=MODEL, messages=HELLO)
    assert plain.choices[0].message.content == "echo: hello big world"
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (3, 4)

    stream = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_raw_stream_ends_with_done(shared: tuple[str, FakeEngine]) -> None:
    url, _ = shared
    body = {"messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_completions_with_the_openai_client(sdk: OpenAI) -> None:
    done = sdk.completions.create(model=MODEL, prompt="one two three", max_tokens=2)
    assert done.choices[0].text == "echo: one" and done.choices[0].finish_reason == "length"
    streamed = list(sdk.completions.create(model=MODEL, prompt="one two", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == "echo: one two"


def test_models_with_the_openai_client(sdk: OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_api_key_with_the_openai_client(shared: tuple[str, FakeEngine]) -> None:
    wrong = OpenAI(base_url=f"{shared[0]}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.chat.completions.create(model=MODEL, messages=HELLO)
    assert httpx.get(f"{shared[0]}/v1/models").status_code == 401


def test_client_errors_with_the_openai_client(sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        sdk.chat.completions.create(model=MODEL, messages=HELLO, n=2)
    bad_image: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "bad://x.png"}}]}
    ]
    with pytest.raises(openai.BadRequestError, match=re.escape("could not load image 'bad://x.png'")):
        sdk.chat.completions.create(model=MODEL, messages=bad_image)


def test_extensions_and_unknown_fields_through_extra_body(sdk: OpenAI, shared: tuple[str, FakeEngine]) -> None:
    extra = {"top_k": 5, "repetition_penalty": 1.1, "ignore_eos": True, "some_future_field": {"a": 1}}
    r = sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, extra_body=extra)
    assert r.usage is not None and r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    sampling = shared[1].requests[-1].sampling
    assert (sampling.top_k, sampling.repetition_penalty, sampling.ignore_eos) == (5, 1.1, True)


def test_inflight_limit_with_the_openai_client() -> None:
    engine = FakeEngine(MODEL, delay_s=0.1)
    with serving(engine, max_inflight=1, retry_after_s=2) as url:
        sdk = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        first = next(iter(stream))  # the slot is held while the stream is open
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.response.headers["retry-after"] == "2"
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason == "stop"
        assert sdk.chat.completions.create(model=MODEL, messages=HELLO).choices[0].finish_reason == "stop"


def test_streaming_client_disconnect_cancels_the_engine_request() -> None:
    engine = FakeEngine(MODEL, delay_s=1.5)  # the next chunk is 1.5 s away: cancellation must not wait for it
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 50)}]
    with serving(engine) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": long_prompt, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: generation is under way
        assert engine.cancelled.wait(1.0), "the engine did not see the request cancelled"
        deadline = time.monotonic() + 5
        while "vlm_frontend_inflight_requests 0.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the in-flight slot was not released"
            time.sleep(0.02)


def test_non_streaming_client_disconnect_cancels_the_engine_request() -> None:
    engine = FakeEngine(MODEL, delay_s=0.2)
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 50)}]
    with serving(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"messages": long_prompt}, timeout=0.5)
        assert engine.cancelled.wait(5), "the engine did not see the request cancelled"


@pytest.mark.parametrize("loop,http", [("asyncio", "h11"), ("uvloop", "httptools")])
def test_streaming_on_each_event_loop_and_http_parser(loop: str, http: str) -> None:
    """The C implementations (the default when installed) and the pure-Python ones serve the same stream."""
    engine = FakeEngine(MODEL)
    with serving(engine, loop=loop, http=http) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
        chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True, max_tokens=5,
                                                     stream_options={"include_usage": True}))
        whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_loop_and_http_flags_resolve_auto_to_what_is_installed() -> None:
    settings = parse_args(["--model-name", "m"])
    assert (settings.loop, settings.http) == ("auto", "auto")
    assert server_implementations(settings) == ("uvloop", "httptools")  # both are dependencies of the package
    chosen = parse_args(["--model-name", "m", "--loop", "asyncio", "--http", "h11"])
    assert server_implementations(chosen) == ("asyncio", "h11")
    with pytest.raises(SystemExit):
        parse_args(["--model-name", "m", "--loop", "trio"])
    with pytest.raises(ValueError, match="http must be one of"):
        Settings(http="h2")


def test_workers_flag_and_busy_port() -> None:
    assert parse_args(["--model-name", "m"]).workers == 1
    assert parse_args(["--model-name", "m", "--workers", "4"]).workers == 4
    with pytest.raises(SystemExit):
        parse_args(["--model-name", "m", "--workers", "0"])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Settings(workers=0)
    # the workers' sockets share the port with each other, not with a process already listening on it
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(SetupError, match="is in use"):
            bind("127.0.0.1", taken.getsockname()[1], reuse_port=True)
    finally:
        taken.close()
    first = bind("127.0.0.1", 0, reuse_port=True)
    try:
        second = bind("127.0.0.1", first.getsockname()[1], reuse_port=True)
        second.close()
        first.listen()  # a running --workers server: a second one on its port is refused, not let in beside it
        with pytest.raises(SetupError, match="is in use"):
            bind_workers("127.0.0.1", first.getsockname()[1], 2)
    finally:
        first.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    group = bind_workers("127.0.0.1", port, 3)
    assert [s.getsockname()[1] for s in group] == [port] * 3
    for s in group:
        s.close()


def test_stale_metrics_dirs_of_dead_supervisors_are_removed(tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(done.stdout), os.getpid()
    for pid in (dead, alive):
        (tmp_path / f"{METRICS_DIR_PREFIX}{pid}-x").mkdir()
    (tmp_path / "unrelated").mkdir()
    remove_stale_metrics_dirs(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{METRICS_DIR_PREFIX}{alive}-x", "unrelated"])


def test_a_metrics_dir_set_by_the_deployment_is_emptied_of_earlier_runs(tmp_path: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "counter_12345.db").write_bytes(b"old run")
    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert metrics_dir_for_this_run() == (str(tmp_path), False)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
