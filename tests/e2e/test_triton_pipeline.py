"""Issue #3 on the real tritonserver: greedy tokens through preprocess -> vision_encoder -> llm -> postprocess,
driven by the BLS over gRPC streaming, equal transformers' InternVL on the same weights; bad input is refused
with INVALID_ARGUMENT and the server keeps serving; concurrency and cancellation leave nothing stuck."""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.bls_client import bls_generate, ensemble_generate
from tests.e2e.reference import reference_generate

pytestmark = pytest.mark.e2e
MAX_NEW = 12


def image(url: str, text: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def cases(media: Path) -> dict[str, list[dict[str, Any]]]:
    wide, tall = f"file://{media}/wide.png", f"file://{media}/tall.png"
    return {
        "text_only": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "single_image_13_tiles": [image(wide, "What is in the picture?")],
        "two_images": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": wide}},
                {"type": "image_url", "image_url": {"url": tall}},
                {"type": "text", "text": "Compare the two images."},
            ]},
        ],
        "multi_turn": [
            {"role": "system", "content": "You are a terse assistant."},
            image(tall, "Describe it."),
            {"role": "assistant", "content": "A tall picture with colours."},
            {"role": "user", "content": "Which colour dominates? 用中文回答。"},
        ],
    }


@pytest.mark.parametrize("case", ["text_only", "single_image_13_tiles", "two_images", "multi_turn"])
def test_greedy_tokens_equal_transformers(stack, tiny_internvl3_hf, case) -> None:
    messages = cases(stack.media_dir)[case]
    ref_tokens, prompt_len = reference_generate(
        stack.checkpoint, tiny_internvl3_hf, stack.media_dir, messages, MAX_NEW
    )
    from vlm_triton.families import open_family

    tokenizer = open_family(stack.checkpoint).load_tokenizer()
    expected_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
    for stream in (True, False):
        got = bls_generate(stack.grpc_url, messages, max_tokens=MAX_NEW, stream=stream)
        assert got.error is None, got.error.message()
        assert got.prompt_tokens == prompt_len
        assert got.completion_tokens == len(ref_tokens)
        assert got.text == expected_text
        stopped = ref_tokens[-1] in open_family(stack.checkpoint).stop_token_ids(tokenizer)
        assert got.finish_reason == ("stop" if stopped else "length")
    if case == "single_image_13_tiles":  # 800x600 -> 4x3 grid + thumbnail = 13 tiles of 256 tokens
        assert prompt_len > 13 * 256 and prompt_len < 13 * 256 + 100


@pytest.mark.parametrize("case", ["text_only", "single_image_13_tiles", "two_images"])
def test_ensemble_equals_the_bls(stack, case) -> None:
    """The ensemble (gRPC streaming, one response) gives the BLS's greedy text and counts (13 tiles: chunked)."""
    messages = cases(stack.media_dir)[case]
    want = bls_generate(stack.grpc_url, messages, max_tokens=MAX_NEW)
    got = ensemble_generate(stack.grpc_url, messages, max_tokens=MAX_NEW, temperature=0.0)
    assert want.error is None and got.error is None, (got.error or want.error).message()
    assert len(got.deltas) == 1
    assert (got.text, got.prompt_tokens, got.completion_tokens) == (
        want.text, want.prompt_tokens, want.completion_tokens)


def test_ensemble_bad_image_is_invalid_argument(stack) -> None:
    got = ensemble_generate(stack.grpc_url, [BAD_INPUTS["not an image"]], max_tokens=4)
    assert got.error is not None and got.error.status() == "StatusCode.INVALID_ARGUMENT", got.error
    ok = ensemble_generate(stack.grpc_url, [{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok.error is None and ok.completion_tokens >= 1


def test_streaming_deltas_concatenate_to_the_text(stack) -> None:
    messages = cases(stack.media_dir)["text_only"]
    streamed = bls_generate(stack.grpc_url, messages, max_tokens=24, stream=True, ignore_eos=True)
    whole = bls_generate(stack.grpc_url, messages, max_tokens=24, stream=False, ignore_eos=True)
    assert streamed.completion_tokens == whole.completion_tokens == 24
    assert streamed.finish_reason == whole.finish_reason == "length"
    assert "".join(streamed.deltas) == whole.text and len(streamed.deltas) > 1
    assert len(whole.deltas) == 1


def test_stop_string_cuts_the_text(stack) -> None:
    messages = cases(stack.media_dir)["text_only"]
    whole = bls_generate(stack.grpc_url, messages, max_tokens=24, ignore_eos=True)
    visible = whole.text.strip()
    assert len(visible) >= 4, "the tiny model should say something"
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    got = bls_generate(stack.grpc_url, messages, max_tokens=24, ignore_eos=True, stop=[stop], stream=True)
    assert got.finish_reason == "stop"
    assert got.text == whole.text[: whole.text.find(stop)]


def _image_b64(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_image_sources_agree(stack, http_media) -> None:
    """file://, http:// and data: URLs of the same image give the same answer."""
    answers = set()
    for url in (f"file://{stack.media_dir}/wide.png", f"{http_media}/wide.png", _image_b64(stack.media_dir / "wide.png")):
        got = bls_generate(stack.grpc_url, [image(url, "What is it?")], max_tokens=6)
        assert got.error is None, got.error.message()
        answers.add((got.text, got.prompt_tokens))
    assert len(answers) == 1


BAD_INPUTS = {
    "invalid base64": image("data:image/png;base64,@@@not-base64@@@"),
    "truncated base64": image("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"),
    "not an image": image("data:image/png;base64," + base64.b64encode(b"hello world").decode()),
    "file outside the allow-list": image("file:///etc/hostname"),
    "unreachable url": image("http://127.0.0.1:9/nothing.png"),
    "unsupported scheme": image("ftp://example.com/a.png"),
    "too many images": {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///x.png"}} for _ in range(5)]},
    "placeholder count mismatch": {"role": "user", "content": [
        {"type": "text", "text": "<image> and <image>"}, {"type": "image_url", "image_url": {"url": "file:///x.png"}}]},
    "unknown role": {"role": "wizard", "content": "hi"},
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(stack, name) -> None:
    got = bls_generate(stack.grpc_url, [BAD_INPUTS[name]], max_tokens=4)
    assert got.error is not None, f"{name} was accepted"
    assert got.error.status() == "StatusCode.INVALID_ARGUMENT", (got.error.status(), got.error.message())
    assert len(got.error.message()) > 10
    ok = bls_generate(stack.grpc_url, [{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok.error is None and ok.completion_tokens >= 1


def test_prompt_longer_than_context_is_refused(stack) -> None:
    got = bls_generate(stack.grpc_url, [{"role": "user", "content": "word " * 9000}], max_tokens=4)
    assert got.error is not None and got.error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "tokens" in got.error.message()


def test_sixteen_concurrent_streams_get_their_own_outputs(stack) -> None:
    prompts = [[{"role": "user", "content": f"Request number {i}: count to {i}."}] for i in range(16)]
    solo = [bls_generate(stack.grpc_url, p, max_tokens=10) for p in prompts[:4]]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: bls_generate(stack.grpc_url, p, max_tokens=10, stream=True), prompts))
    assert all(r.error is None for r in results)
    for alone, together in zip(solo, results[:4]):
        assert (alone.text, alone.completion_tokens) == (together.text, together.completion_tokens)
    assert len({r.prompt_tokens for r in results}) > 1
    assert llm_active_requests(stack) == 0


def llm_active_requests(stack) -> float:
    """The llm's own gauge on Triton's metrics endpoint: requests admitted and not finished."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.server.ports.metrics}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("vlm_llm_active_requests{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vlm_llm_active_requests is not exported")


def test_cancelled_request_frees_its_slot(stack) -> None:
    """Close a stream mid-generation; the llm then serves later requests at full concurrency."""
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    seen: list[Any] = []
    client.start_stream(callback=lambda result, error: seen.append((result, error)))
    from tests.e2e.bls_client import bls_inputs

    messages = [{"role": "user", "content": "A very long answer please."}]
    client.async_stream_infer("bls", bls_inputs(messages, max_tokens=4000, ignore_eos=True, stream=True),
                              request_id="to-cancel")
    import time

    deadline = time.monotonic() + 60
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(seen) >= 3, "no tokens streamed"
    assert llm_active_requests(stack) == 1
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 30
    while llm_active_requests(stack) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llm_active_requests(stack) == 0, "the cancelled request is still in the llm"
    # All 8 slots must be usable again: 8 concurrent requests finish.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: bls_generate(stack.grpc_url, messages, max_tokens=3, timeout_s=120),
                                range(8)))
    assert all(r.error is None and r.completion_tokens >= 1 for r in results)


def test_the_preprocess_warmed_up_before_it_was_ready(stack) -> None:
    """multimodal/warmup.py: the stub prepared its warm-up image at start-up (through its own media policy)."""
    log = stack.server.log_file.read_text(errors="replace")
    assert re.search(r"\[preprocess\] warm-up of media requests: \d+ ms", log), log[-3000:]
    assert "warm-up of media requests failed" not in log
