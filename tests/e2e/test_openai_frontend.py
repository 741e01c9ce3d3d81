"""Issue #4 on the real stack: the official `openai` client against the frontend + tritonserver."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import SERVED_NAME
from tests.e2e.test_triton_pipeline import llm_active_requests

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(frontend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=frontend, api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, content: Any, **kw: Any) -> Any:
    messages = content if isinstance(content, list) and content and "role" in content[0] else [
        {"role": "user", "content": content}]
    return client.chat.completions.create(model=SERVED_NAME, messages=messages, **kw)


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_by_file_http_and_base64_agree(client, stack, http_media) -> None:
    path = stack.media_dir / "wide.png"
    b64 = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    answers = []
    for url in (f"file://{path}", f"{http_media}/wide.png", b64):
        r = ask(client, [img(url), {"type": "text", "text": "What is this?"}], max_tokens=8, temperature=0)
        assert r.model == SERVED_NAME and r.id and r.created > 0
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        answers.append((r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens))
    assert len(set(answers)) == 1
    assert answers[0][1] > 13 * 256  # 800x600: 13 tiles of 256 image tokens


def test_two_images_multi_turn_and_text_only(client, stack) -> None:
    wide, tall = f"file://{stack.media_dir}/wide.png", f"file://{stack.media_dir}/tall.png"
    two = ask(client, [img(wide), img(tall), {"type": "text", "text": "Compare."}], max_tokens=6)
    one = ask(client, [img(wide), {"type": "text", "text": "Compare."}], max_tokens=6)
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    turns = [
        {"role": "user", "content": [img(tall), {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A tall image."},
        {"role": "user", "content": "And the colours?"},
    ]
    multi = ask(client, turns, max_tokens=6)
    assert multi.usage.prompt_tokens > one.usage.prompt_tokens - 13 * 256
    text = ask(client, "Just text.", max_tokens=6)
    assert text.usage.prompt_tokens < 100 and text.choices[0].message.content is not None


def test_streaming_with_usage_equals_non_streaming(client) -> None:
    kw = dict(max_tokens=20, temperature=0)
    whole = ask(client, "Say something long.", **kw)
    chunks = list(ask(client, "Say something long.", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_timeline_marks_the_first_token_path_in_order(client, stack, timeline_dir) -> None:
    """VLM_TRITON_TIMELINE_DIR (set for this session's stack and frontend): a streamed image request leaves every
    mark of its first token's path, joined across the frontend, bls and llm processes, in causal order."""
    from benchmarks.timeline import PATH, join, read_marks, table

    image = img(f"file://{stack.media_dir / 'square.jpg'}")
    chunks = list(ask(client, [image, {"type": "text", "text": "Hi"}], stream=True, max_tokens=4,
                      extra_body={"ignore_eos": True}))
    request_id = chunks[0].id
    deadline = time.monotonic() + 10
    # the load generator writes client.*; llm.encoded comes only with engine.vision_in_llm
    server_marks = sorted(e for e, _ in PATH if not e.startswith("client.") and e != "llm.encoded")
    events: dict[str, int] = {}
    while time.monotonic() < deadline and len(events) < len(server_marks):
        events = join(read_marks(timeline_dir)).get(request_id, {})
        time.sleep(0.1)
    assert sorted(events) == server_marks, events
    causal = ["frontend.http", "frontend.receive", "frontend.send", "bls.execute", "pre.execute", "pre.prepared",
              "pre.done", "bls.preprocessed", "vis.execute", "vis.tiles", "vis.encoded", "bls.encoded", "bls.llm_call", "llm.execute", "llm.prefill", "llm.token", "llm.send", "bls.llm_first", "frontend.first", "frontend.sse"]
    assert [events[e] for e in causal] == sorted(events[e] for e in causal)
    # the ends of synchronous sends: the receiver may go on before the sender's call returns
    assert events["llm.send"] <= events["llm.sent"] and events["bls.llm_first"] <= events["bls.sent"]
    one = table({request_id: events})
    assert one["requests"] == 1 and len(one["hops"]) == len(server_marks) - 1
    # a one-token answer: its first token leaves with the llm's final response, which marks it sent too
    short = list(ask(client, "Hi", stream=True, max_tokens=1, extra_body={"ignore_eos": True}))[0].id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "llm.sent" not in join(read_marks(timeline_dir)).get(short, {}):
        time.sleep(0.1)
    marks = join(read_marks(timeline_dir)).get(short, {})
    assert marks["llm.send"] <= marks["llm.sent"], marks


@pytest.mark.parametrize("procs", [1, 2])
def test_load_generator_counts_and_marks_each_request(frontend, timeline_dir, procs) -> None:
    """The benchmarks' load generator against the real stack, in one process and shared by two: every request and
    token counted, and its client marks join the server's on the same request id, before and after them."""
    import asyncio

    from benchmarks.loadgen import run_load
    from benchmarks.timeline import join, read_marks

    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 4,
            "ignore_eos": True, "temperature": 0}
    started = time.monotonic_ns()
    out = asyncio.run(run_load(frontend, body, 2, 4, 120, request_timeout_s=60, timeline_dir=timeline_dir,
                               procs=procs, freeze=False))  # the test process keeps its collector as it is
    assert (out["requests"], out["errors"], out["usage_output_tokens"], out["client_procs"]) == (4, 0, 16, procs)
    assert out["ttft_ms"]["p50"] > 0 and out["output_tok_s"] > 0
    ours = [ev for ev in join(read_marks(timeline_dir)).values() if ev.get("client.send", -1) >= started]
    assert len(ours) == 4
    assert all(ev["client.send"] <= ev["frontend.http"] <= ev["frontend.sse"] <= ev["client.first"] for ev in ours)


def test_max_tokens_gives_length_and_stop_sequences_cut(client) -> None:
    r = ask(client, "Talk.", max_tokens=7, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    text = r.choices[0].message.content
    visible = text.strip()
    assert len(visible) >= 3
    stop = visible[1:3]
    s = ask(client, "Talk.", max_tokens=7, stop=[stop], extra_body={"ignore_eos": True})
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].message.content == text[: text.find(stop)]
    m = ask(client, "Talk.", max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert m.usage.completion_tokens == 3


def test_seed_reproducibility(client) -> None:
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True, "top_k": 50})
    a = ask(client, "Random words please.", seed=1234, **kw).choices[0].message.content
    b = ask(client, "Random words please.", seed=1234, **kw).choices[0].message.content
    c = ask(client, "Random words please.", seed=99, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_completions_and_models(client, frontend) -> None:
    r = client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=5)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    assert client.models.retrieve(SERVED_NAME).id == SERVED_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    base = frontend.removesuffix("/v1")
    assert httpx.get(f"{base}/health/ready").status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert "time_to_first_token" in metrics.lower() or "ttft" in metrics.lower()


BAD = {
    "bad base64": ([img("data:image/png;base64,@@@")], 400),
    "non-image payload": ([img("data:image/png;base64," + base64.b64encode(b"text").decode())], 400),
    "file not allowed": ([img("file:///etc/hostname")], 400),
    "unreachable url": ([img("http://127.0.0.1:9/x.png")], 400),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_media_is_400_with_openai_error_body(frontend, name) -> None:
    content, status = BAD[name]
    r = httpx.post(f"{frontend}/chat/completions", timeout=60, json={
        "model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        ({"model": SERVED_NAME, "messages": []}, 400),
        ({"model": SERVED_NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({"model": SERVED_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400),
        ({"model": SERVED_NAME, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400),
        ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404),
        ({"model": SERVED_NAME, "messages": [{"role": "user", "content": "word " * 9000}]}, 400),
    ],
)
def test_bad_requests_get_their_status(frontend, body, status) -> None:
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(f"{frontend}/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type"}


def test_32_concurrent_streams_with_disconnects_leave_nothing_stuck(client, frontend, stack) -> None:
    def run(i: int) -> tuple[int, int]:
        stream = ask(client, f"Client {i} wants a long answer.", stream=True, max_tokens=40,
                     extra_body={"ignore_eos": True})
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if i % 5 == 0 and received >= 3:
                stream.close()  # disconnect midway
                return i, -1
        return i, received

    with ThreadPoolExecutor(32) as pool:
        results = dict(pool.map(run, range(32)))
    assert all(v > 0 for i, v in results.items() if i % 5), results
    deadline = time.monotonic() + 30
    while llm_active_requests(stack) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert llm_active_requests(stack) == 0
    assert ask(client, "Still alive?", max_tokens=2).usage.completion_tokens >= 1
