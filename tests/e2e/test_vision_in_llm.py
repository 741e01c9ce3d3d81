"""`engine.vision_in_llm` on the real tritonserver: the bls sends each request's decoded images to the llm, which
cuts and encodes them on its own thread (no vision_encoder call, the embeddings never leave the llm's device).
The images go by reference through preprocess's plane pool (plane_pool.py), by value for the ensemble.
Greedy tokens equal transformers' InternVL on the same weights, streamed or not; concurrent image requests get
their own outputs (the llm batches their images); the ensemble, which still calls the vision_encoder stage (loaded
at its first request), agrees; a request cancelled while its images are encoded, or after, frees its slot."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.bls_client import bls_generate, bls_inputs, ensemble_generate
from tests.e2e.conftest import SERVED_NAME, Stack, running_stack
from tests.e2e.reference import reference_generate
from tests.e2e.test_triton_pipeline import MAX_NEW, cases, image, llm_active_requests

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def inline_stack(tiny_internvl3: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tiny_internvl3, media_dir, tmp_path_factory.mktemp("inline-vision"), SERVED_NAME,
                       engine={"vision_in_llm": True}, preprocess={"image_resize": "device"}) as stack:
        yield stack


@pytest.mark.parametrize("case", ["single_image_13_tiles", "two_images", "multi_turn"])
def test_greedy_tokens_equal_transformers(inline_stack: Stack, tiny_internvl3_hf: Path, case: str) -> None:
    from vlm_triton.families import open_family

    messages = cases(inline_stack.media_dir)[case]
    ref_tokens, prompt_len = reference_generate(
        inline_stack.checkpoint, tiny_internvl3_hf, inline_stack.media_dir, messages, MAX_NEW)
    tokenizer = open_family(inline_stack.checkpoint).load_tokenizer()
    encoded_by_the_stage = vision_encoder_calls(inline_stack)
    sent_before = planes_sent(inline_stack)
    for stream in (True, False):
        got = bls_generate(inline_stack.grpc_url, messages, max_tokens=MAX_NEW, stream=stream)
        assert got.error is None, got.error.message()
        assert (got.prompt_tokens, got.completion_tokens) == (prompt_len, len(ref_tokens))
        assert got.text == tokenizer.decode(ref_tokens, skip_special_tokens=True)
    assert vision_encoder_calls(inline_stack) == encoded_by_the_stage  # the llm encoded them
    # read from preprocess's plane pool (preprocess.plane_pool_mib), not sent through Triton
    assert planes_sent(inline_stack) == {**sent_before, "reference": sent_before["reference"] + 2}


def planes_sent(stack: Stack) -> dict[str, float]:
    """preprocess's vlm_preprocess_image_planes_total, by how the planes went (reference or value)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.server.ports.metrics}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    found = {line.split('sent="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in lines if line.startswith("vlm_preprocess_image_planes_total{")}
    assert set(found) == {"reference", "value"}, lines
    return found


def vision_encoder_calls(stack: Stack) -> int:
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    stats = client.get_inference_statistics("vision_encoder", as_json=True)["model_stats"][0]["inference_stats"]
    return int(stats["success"].get("count", 0))


def test_concurrent_image_requests_get_their_own_outputs(inline_stack: Stack) -> None:
    media = inline_stack.media_dir
    names = ["wide.png", "tall.png", "small.png", "square.jpg"]
    prompts = [[image(f"file://{media}/{names[i % 4]}", f"Question {i}: what do you see?")] for i in range(8)]
    solo = [bls_generate(inline_stack.grpc_url, p, max_tokens=8) for p in prompts[:4]]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: bls_generate(inline_stack.grpc_url, p, max_tokens=8, stream=True), prompts))
    assert all(r.error is None for r in together), [r.error for r in together if r.error]
    for alone, got in zip(solo, together[:4]):
        assert (alone.text, alone.prompt_tokens, alone.completion_tokens) == (
            got.text, got.prompt_tokens, got.completion_tokens)
    assert len({r.prompt_tokens for r in together}) > 1  # images of different tile counts
    assert llm_active_requests(inline_stack) == 0


def test_the_ensemble_still_encodes_through_the_vision_encoder_stage(inline_stack: Stack) -> None:
    messages = cases(inline_stack.media_dir)["two_images"]
    want = bls_generate(inline_stack.grpc_url, messages, max_tokens=MAX_NEW)
    by_value = planes_sent(inline_stack)["value"]
    got = ensemble_generate(inline_stack.grpc_url, messages, max_tokens=MAX_NEW, temperature=0.0)
    assert planes_sent(inline_stack)["value"] == by_value + 1  # the ensemble does not ask for pixel_ref
    assert want.error is None and got.error is None, (got.error or want.error).message()
    assert (got.text, got.prompt_tokens, got.completion_tokens) == (want.text, want.prompt_tokens,
                                                                     want.completion_tokens)
    assert vision_encoder_calls(inline_stack) > 0


@pytest.mark.parametrize("wait_for_tokens", [0, 2])
def test_a_cancelled_image_request_frees_its_slot(inline_stack: Stack, wait_for_tokens: int) -> None:
    """Cancelled at once (its images most likely still being encoded) or after its first tokens."""
    client = grpcclient.InferenceServerClient(inline_stack.grpc_url)
    seen: list[Any] = []
    client.start_stream(callback=lambda result, error: seen.append((result, error)))
    messages = [image(f"file://{inline_stack.media_dir}/wide.png", "A very long answer please.")]
    client.async_stream_infer("bls", bls_inputs(messages, max_tokens=4000, ignore_eos=True, stream=True),
                              request_id=f"cancel-{wait_for_tokens}")
    deadline = time.monotonic() + 120
    while len(seen) < wait_for_tokens and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(seen) >= wait_for_tokens
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 60
    while llm_active_requests(inline_stack) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llm_active_requests(inline_stack) == 0
    after = bls_generate(inline_stack.grpc_url, [image(f"file://{inline_stack.media_dir}/small.png", "Hi")],
                         max_tokens=3, ignore_eos=True)
    assert after.error is None and after.completion_tokens == 3
